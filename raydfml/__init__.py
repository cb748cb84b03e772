"""raydfml: a Ray-based engine for data-free meta-learning.

Researchers give it a pool of pre-trained classifiers and get back a few-shot learner trained
without the teachers' data. See README.md and the modules' docstrings:

- ``raydfml.data``      seed-layout datasets, the embedded ``glyphs`` set, episodic sampling
- ``raydfml.models``    conv4 / resnet backbones (teacher and functional meta-model), generator
- ``raydfml.zoo``       building and loading teacher pools
"""

__version__ = "0.1.0"
