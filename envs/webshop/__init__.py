"""WebShop: a text shop over a product catalog (generated offline, or WebShop's real product files) with
WebShop's reward. `raysad_envs.make("webshop")` or `gymnasium.make("raysad/WebShop-v0")`."""
from __future__ import annotations

from .catalog import get_shop
from .env import WebShopEnv
from .goal import get_attribute_reward, get_option_reward, get_reward, get_type_reward


def list_tasks(split: str = "train", data=None, seed: int = 0, num_products: int | None = None,
               num_tasks: int | None = None, **_ignored) -> list[str]:
    """The task ids of a split in a fixed order (the same keywords as WebShopEnv; max_steps etc. are ignored)."""
    ids = get_shop(data, int(seed), num_products).split_ids(split)
    return list(ids[:num_tasks] if num_tasks is not None else ids)


__all__ = ["WebShopEnv", "list_tasks", "get_reward", "get_type_reward", "get_attribute_reward",
           "get_option_reward"]
