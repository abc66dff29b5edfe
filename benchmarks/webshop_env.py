"""WebShop environment figures: catalog generation and bm25s indexing time, expert success, steps per episode,
environment steps per second (expert turns, and a random agent picking admissible actions).

    python benchmarks/webshop_env.py [--products 2000 10000] [--episodes 50] [--data PATH ...]
"""
from __future__ import annotations

import argparse
import random
import time

from raysad_envs.webshop.catalog import Shop, get_shop
from raysad_envs.webshop.env import WebShopEnv
from raysad_envs.webshop.generate import generate_catalog


def build_times(num_products: int, seed: int = 0) -> tuple[float, float]:
    t0 = time.perf_counter()
    products, prices, goals = generate_catalog(seed=seed, num_products=num_products)
    t1 = time.perf_counter()
    Shop(products, goals, seed, prices).search("warm up the index")
    return t1 - t0, time.perf_counter() - t1


def run(env: WebShopEnv, episodes: int, expert: bool, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ids = env.task_ids()[:episodes]
    steps = successes = 0
    score = 0.0
    t0 = time.perf_counter()
    for task in ids:
        obs, info = env.reset(options={"task_id": task})
        done = False
        while not done:
            if expert:
                action = env.expert_turn()[1]
            else:
                action = rng.choice(info["admissible_actions"]).replace("<query>", env.goal()["query"])
            obs, reward, terminated, truncated, info = env.step(action)
            steps += 1
            done = terminated or truncated
        successes += info["success"]
        score += info["score"]
    dt = time.perf_counter() - t0
    return {"episodes": len(ids), "success": successes / len(ids), "score": score / len(ids),
            "steps/episode": steps / len(ids), "steps/s": steps / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, nargs="+", default=[2000, 10000], help="catalog sizes to build")
    ap.add_argument("--episodes", type=int, default=50, help="episodes per measurement (test split)")
    ap.add_argument("--data", nargs="*", help="real WebShop files or folders instead of a generated catalog")
    args = ap.parse_args()

    if not args.data:
        print(f"{'products':>9} {'generate s':>11} {'index s':>8}")
        for n in args.products:
            gen, index = build_times(n)
            print(f"{n:>9} {gen:>11.3f} {index:>8.3f}")
    get_shop(args.data, 0, None if args.data else args.products[0])
    split = "train" if args.data else "test"
    env = WebShopEnv(split=split, data=args.data, num_products=None if args.data else args.products[0])
    print(f"\n{'agent':>8} {'episodes':>9} {'success':>8} {'score':>6} {'steps/ep':>9} {'steps/s':>8}")
    for name, expert in (("expert", True), ("random", False)):
        r = run(env, args.episodes, expert)
        print(f"{name:>8} {r['episodes']:>9} {r['success']:>8.2f} {r['score']:>6.3f} {r['steps/episode']:>9.2f} "
              f"{r['steps/s']:>8.0f}")


if __name__ == "__main__":
    main()
