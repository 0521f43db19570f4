"""Worked examples of extending the plugins by subclassing, each run from YAML by a test.

- ``proportional_bias.py``: a bias-update rule for aux-loss-free balancing (``AuxLossFreeBalancing.bias_step``).
- ``fp8_tiles.py``: an FP8 recipe with 1 x 32 tiles (``FP8Recipe`` and ``FP8Precision.build_recipe``).
- ``mtp_depth_decay.py``: an MTP loss weighting that decays with depth (``MultiTokenPrediction.weighted_loss``).

Each has a YAML file beside it to put on top of a model config, e.g.
``dsv3 fit --config configs/tiny.yaml --config plugins/examples/proportional_bias.yaml``.
"""
