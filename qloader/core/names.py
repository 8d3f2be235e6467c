"""The names of the seven stages, in run order.

A leaf module: `qloader-report` reads stage names from manifests without importing the stages.
"""

STAGE_NAMES = ("resolve", "instantiate", "validate", "device_map", "preprocess", "load", "postprocess")
