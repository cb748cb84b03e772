"""raydfml: a Ray-based engine for data-free meta-learning.

Researchers give it a pool of pre-trained classifiers and get back a few-shot learner trained
without the teachers' data. See README.md and the modules' docstrings:

- ``raydfml.data``         seed-layout datasets, the embedded ``glyphs`` set, episodic sampling
- ``raydfml.models``       conv4 / resnet backbones (teacher and functional meta-model), generator
- ``raydfml.zoo``          building and loading teacher pools
- ``raydfml.learners``     MAML, ANIL, ProtoNet, Reptile (torch.func)
- ``raydfml.synthesis``    per-teacher synthesizers by name, FREE's meta-generator, PURER's dataset
- ``raydfml.aggregation``  aggregation rules by name (mean, align, igr), TGR's task space
- ``raydfml.methods``      the methods, one registered module each (deepinv, geninv, purer, free, tgr)
- ``raydfml.config``       typed configs; scenario x method x profile resolved in one place
- ``raydfml.runtime``      TeacherPool and MetaLearner roles, the round loop, in-process or on Ray
- ``raydfml.experiment``   one experiment end to end (``compare``: several methods; ``tune``: sweeps)
- ``raydfml.artifact``     a run's meta-model on its own: ``raydfml.load_meta_model(run_dir)``
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # load_meta_model without importing torch-heavy modules on `import raydfml`
    if name == "load_meta_model":
        from .artifact import load_meta_model

        return load_meta_model
    raise AttributeError(f"module 'raydfml' has no attribute {name!r}")
