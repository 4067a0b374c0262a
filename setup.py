"Packaging for miniai: every setting lives in settings.ini, the nbdev 2 way."
from configparser import ConfigParser
from pathlib import Path
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read(Path(__file__).parent/'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
reqs = lambda key: cfg.get(key, '').split()

spdx = {'apache2': 'Apache-2.0'}[cfg['license']]  # the licence as an SPDX id (PEP 639), not a classifier
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable']

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    long_description=(Path(__file__).parent/'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'] or None, license_expression=spdx, url=cfg['git_url'] or None,
    keywords=cfg['keywords'],
    classifiers=[f"Development Status :: {statuses[int(cfg['status'])]}", 'Intended Audience :: Developers', 'Programming Language :: Python :: 3',
                 *[f'Programming Language :: Python :: 3.{v}' for v in (10, 11, 12)]],
    # miniai/data has no __init__.py: named here as a package of data files, it goes into the wheel with no warning
    packages=['miniai', 'miniai.data'], package_data={'miniai.data': ['*.npz']},
    python_requires=f">={cfg['min_python']}",
    install_requires=reqs('requirements'),
    extras_require={k: reqs(f'{k}_requirements') for k in ('dev', 'vision', 'tensorboard')},
    entry_points={'console_scripts': cfg['console_scripts'].split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False)
