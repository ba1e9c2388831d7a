# MMDetection's runtime plus two hooks for long runs (tokenprune.mmdet_plugin.reliability):
# - StopOnNonFiniteLossHook: training ends with one message naming the iteration, the NaN/inf loss terms and the
#   last checkpoint as soon as the loss is not finite (checked every iteration, before anything is saved);
# - RandomStateHook: checkpoints carry torch's random state, so --resume continues exactly where a run stopped.
# They are named entries of default_hooks, which child configs merge key by key, so they survive inheritance.
# Switch one off with default_hooks = dict(check_invalid_loss=None) (or random_state=None).
# Every run is seeded (python, numpy, torch and the dataloader workers): the same command on the same machine
# repeats its figures; run another seed with --cfg-options randomness.seed=N to see the run-to-run spread.
_base_ = 'mmdet::_base_/default_runtime.py'

randomness = dict(seed=0)

default_hooks = dict(
    check_invalid_loss=dict(type='StopOnNonFiniteLossHook', interval=1),
    random_state=dict(type='RandomStateHook'))
