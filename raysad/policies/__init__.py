"""How an agent picks its next turn: a text engine (hf, vllm, openai) driven by `next_turns`, or the expert.

    engine = make_policy("hf", "runs/teacher")            # or "vllm", "openai"; "expert" needs no model
    turns = next_turns(engine, tokenizer, get_format("hotpotqa"), prompts, histories, topk=20)
"""
from raysad.policies.base import Engine, Generation, cut_at_stop, make_policy, next_turns

__all__ = ["Engine", "Generation", "cut_at_stop", "make_policy", "next_turns"]
