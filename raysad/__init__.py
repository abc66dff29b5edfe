"""raysad: Structured Agent Distillation of ReAct agents, scaled with Ray."""
__version__ = "0.1.0"
