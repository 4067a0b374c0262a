"pick_threads: how many torch threads a run uses on a busy machine."

def test_pick_threads_from_faked_load():
    from miniai.conv import pick_threads
    assert pick_threads(3, default=2, env={}, load=9., cores=2) == (3, None)                 # --threads wins
    # the user's env
    assert pick_threads(None, default=2, env={'OMP_NUM_THREADS': '2'}, load=9., cores=2) == (None, None)
    assert pick_threads(None, default=2, env={}, load=0.4, cores=2) == (None, None)          # quiet: torch's default
    n, notice = pick_threads(None, default=2, env={}, load=1.1, cores=2)                     # one core taken
    assert n == 1 and 'busy' in notice and 'load average 1.1' in notice and '--threads' in notice
    assert pick_threads(None, default=2, env={}, load=30., cores=2)[0] == 1                  # never below one
    assert pick_threads(None, default=8, env={}, load=6., cores=16) == (None, None)          # 10 cores free >= 8
    assert pick_threads(None, default=8, env={}, load=11.7, cores=16)[0] == 4
