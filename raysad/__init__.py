"""raysad: Structured Agent Distillation of ReAct agents, scaled with Ray."""
import os

# Models load from local directories in milliseconds; transformers' per-load progress bars (printed by every
# Ray actor) are noise in the stage logs. Set HF_HUB_DISABLE_PROGRESS_BARS=0 to have them back.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
