"Scheduler callbacks in the corners the notebook doesn't show: several param groups, tensor lrs, validation-free fits."
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim.lr_scheduler import OneCycleLR, StepLR
from torch.utils.data import DataLoader, TensorDataset

from miniai.datasets import DataLoaders
from miniai.learner import Learner, TrainCB
from miniai.sgd import BatchSchedCB, EpochSchedCB, ParamSchedCB, RecorderCB, _lr, _mom
from miniai.training import sched_lin

N_BATCHES = 4


def make_learner(cbs=(), lr=0.01):
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    ds = TensorDataset(x, x.sum(1, keepdim=True))
    dls = DataLoaders(DataLoader(ds, 8, shuffle=True), DataLoader(ds, 16))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    return Learner(model, dls, F.mse_loss, lr=lr, cbs=[TrainCB(), *cbs])


# With lr=None the Learner leaves the lrs of an optimizer we set ourselves alone (otherwise each fit sets learn.lr on
# every group), so these tests see only what the scheduler callbacks do.
def two_group_opt(model):
    return optim.SGD([{'params': model[0].parameters(), 'lr': 0.1},
                      {'params': model[2].parameters(), 'lr': 0.01, 'momentum': 0.5}], lr=0.01)


def test_param_sched_sets_every_group_and_restores_each():
    learn = make_learner(lr=None)
    learn.opt = two_group_opt(learn.model)
    seen = []
    class Spy:
        order = 1
        def after_step(self, learn): seen.append([g['lr'] for g in learn.opt.param_groups])
    learn.fit(1, cbs=[ParamSchedCB('lr', sched_lin(1., 2.)), Spy()], valid=False)
    assert seen == [[1 + i/N_BATCHES]*2 for i in range(N_BATCHES)]
    assert [g['lr'] for g in learn.opt.param_groups] == [0.1, 0.01]
    assert [g['momentum'] for g in learn.opt.param_groups] == [0, 0.5]


def test_one_cycle_per_group_max_lr_and_restore():
    learn = make_learner(lr=None)
    learn.opt = two_group_opt(learn.model)
    learn.fit(1, cbs=BatchSchedCB(partial(OneCycleLR, max_lr=[1., 0.1], total_steps=N_BATCHES)))
    assert [g['lr'] for g in learn.opt.param_groups] == [0.1, 0.01]
    assert all('max_lr' not in g and 'initial_lr' not in g for g in learn.opt.param_groups)


def test_tensor_lr_is_updated_in_place():
    learn = make_learner(lr=None)
    learn.opt = optim.Adam(learn.model.parameters(), lr=torch.tensor(0.01), foreach=False)
    lr_t = learn.opt.param_groups[0]['lr']
    rec = RecorderCB(lr=_lr, mom=_mom)
    learn.fit(1, cbs=[rec, ParamSchedCB('lr', sched_lin(0.1, 0.2)), ParamSchedCB('mom', sched_lin(0.9, 0.8))],
              valid=False)
    assert rec.recs['lr'] == pytest.approx([0.1 + 0.1*i/N_BATCHES for i in range(N_BATCHES)])
    assert rec.recs['mom'] == pytest.approx([0.9 - 0.1*i/N_BATCHES for i in range(N_BATCHES)])
    assert learn.opt.param_groups[0]['lr'] is lr_t and float(lr_t) == pytest.approx(0.01)
    assert learn.opt.param_groups[0]['betas'] == (0.9, 0.999)


def test_epoch_sched_ignores_validation_and_train_free_fits():
    learn = make_learner()
    cb = EpochSchedCB(partial(StepLR, step_size=1, gamma=0.5))
    learn.fit(3, valid=False, cbs=cb)
    assert cb.schedo.last_epoch == 3
    cb = EpochSchedCB(partial(StepLR, step_size=1, gamma=0.5))
    learn.fit(2, train=False, cbs=cb)
    assert cb.schedo.last_epoch == 0


def test_recorder_and_param_sched_reject_bad_arguments():
    with pytest.raises(ValueError, match='at least one'): RecorderCB()
    with pytest.raises(TypeError, match='not a function'): RecorderCB(lr=0.1)
    with pytest.raises(TypeError, match='setting name'): ParamSchedCB(3, sched_lin(0, 1))


def test_param_sched_needs_a_sized_train_loader():
    learn = make_learner()
    learn.dls.train = iter(list(learn.dls.train))
    with pytest.raises(TypeError, match='len'): learn.fit(1, valid=False, cbs=ParamSchedCB('lr', sched_lin(0.1, 0.2)))


def test_recorder_gives_course_style_functions_the_first_group_as_pg():
    learn = make_learner(lr=None)
    learn.opt = optim.SGD([{'params': learn.model[0].parameters(), 'lr': 0.1},
                           {'params': learn.model[2].parameters(), 'lr': 0.01}], lr=0.01, momentum=0.9)
    def course_lr(cb): return cb.pg['lr']   # the course's recorder functions take the callback
    rec = RecorderCB(lr=_lr, course=course_lr)
    learn.fit(1, valid=False, cbs=[rec, ParamSchedCB('lr', sched_lin(1., 2.))])
    assert rec.recs['course'] == rec.recs['lr'] == pytest.approx([1 + i/N_BATCHES for i in range(N_BATCHES)])
    assert rec.pg is learn.opt.param_groups[0]


def test_has_learn_cb_lets_go_of_the_learner_after_fit():
    from miniai.sgd import HasLearnCB
    class Peek(HasLearnCB):
        def after_step(self, learn): self.during = self.learn
    cb = Peek()
    learn = make_learner(cbs=[cb])
    learn.fit(1, valid=False)
    assert cb.during is learn and cb.learn is None


def test_checkpoint_loaded_before_any_fit_sets_the_schedule(tmp_path):
    "A BatchSchedCB's position saved mid-run is applied by `learn.load` before the next fit makes its scheduler."
    import miniai.checkpoint  # noqa: F401 (adds Learner.save/load)
    sched = partial(StepLR, step_size=1, gamma=0.5)
    a = make_learner([BatchSchedCB(sched)])
    a.fit(1)
    a.save(tmp_path/'ck.pt')
    b = make_learner([cb := BatchSchedCB(sched)])
    b.load(tmp_path/'ck.pt')  # no fit yet: the scheduler doesn't exist, so its state waits
    assert cb.state_dict()['last_epoch'] == N_BATCHES
    b.fit(1, lr=0.01)
    assert cb.schedo.last_epoch == 2*N_BATCHES
