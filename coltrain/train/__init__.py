"""Training: train state, pure train/eval steps, optimizers, checkpoints, the loop."""

from coltrain.train.checkpoint import Checkpointer
from coltrain.train.fingerprint import params_fingerprint
from coltrain.train.loop import evaluate, train_and_evaluate
from coltrain.train.optim import make_optimizer, make_schedule
from coltrain.train.state import TrainState, create_train_state
from coltrain.train.step import (make_accumulate_step, make_eval_step, make_predict_step,
                                 make_train_step, preprocess)

__all__ = ["TrainState", "create_train_state", "make_train_step", "make_accumulate_step",
           "make_eval_step",
           "make_predict_step", "preprocess", "make_optimizer", "make_schedule", "Checkpointer",
           "params_fingerprint", "train_and_evaluate", "evaluate"]
