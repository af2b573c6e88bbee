"""Lightning callbacks: evaluation protocol, pictures, loggers, exact resume and fault handling."""
from onestep.callbacks.evaluation import EvaluationCallback
from onestep.callbacks.fault import NonFiniteGuard, PreemptionCheckpoint, check_checkpoint_file
from onestep.callbacks.loggers import make_loggers, wandb_key_configured
from onestep.callbacks.reliability import ExactCheckpoint, ResumableRNG
from onestep.callbacks.visuals import make_grid, save_image_grid, save_scatter

__all__ = ["EvaluationCallback", "ExactCheckpoint", "NonFiniteGuard", "PreemptionCheckpoint", "ResumableRNG",
           "check_checkpoint_file", "make_loggers", "wandb_key_configured", "make_grid", "save_image_grid",
           "save_scatter"]
