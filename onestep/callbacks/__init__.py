"""Lightning callbacks: evaluation protocol, pictures, logger construction."""
from onestep.callbacks.evaluation import EvaluationCallback
from onestep.callbacks.loggers import make_loggers, wandb_key_configured
from onestep.callbacks.visuals import make_grid, save_image_grid, save_scatter

__all__ = ["EvaluationCallback", "make_loggers", "wandb_key_configured", "make_grid", "save_image_grid",
           "save_scatter"]
