"""`raysad envs list` and `raysad envs play`: look at the environments as a person would."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

import raysad_envs
from raysad import ui

console = ui.console()


def list_envs() -> None:
    import gymnasium as gym

    table = Table(title="raysad environments")
    for column in ("name", "gymnasium id", "agent format", "max steps", "metric", "offline data"):
        table.add_column(column, no_wrap=column in ("name", "gymnasium id"))
    metrics = {"alfworld": "success (won)", "hotpotqa": "EM (reward), F1", "webshop": "WebShop score"}
    sources = {"alfworld": "generated PDDL games (TextWorld)", "hotpotqa": "generated multi-hop corpus",
               "webshop": "generated product catalog"}
    for name, (gym_id, _, _) in raysad_envs.ENVS.items():
        env_cls = gym.registry[gym_id].entry_point
        if isinstance(env_cls, str):
            module, attr = env_cls.split(":")
            env_cls = getattr(__import__(module, fromlist=[attr]), attr)
        table.add_row(name, gym_id, env_cls.agent_format, str(env_cls.default_max_steps),
                      metrics.get(name, ""), sources.get(name, ""))
    console.print(table)
    console.print("Real data: pass --data PATH (ALFWorld json_2.1.1 root, HotpotQA JSON, WebShop items files).")


def play(env_name: str, split: str, task_id: str | None, data: str | None, seed: int, expert: bool,
         few_shot: int) -> None:
    kwargs = {"split": split} | ({"data": data} if data else {})
    env = raysad_envs.make(env_name, **kwargs)
    base = env.unwrapped
    try:
        try:
            obs, info = env.reset(seed=seed, options={"task_id": task_id} if task_id else None)
        except KeyError as err:  # an unknown --task-id: a one-line message (`raysad envs play` exits 2), not a trace
            raise ValueError(f"--task-id {task_id!r}: {err.args[0] if err.args else err}") from None
        console.rule(f"[bold]{env_name}[/] task {info['task_id']} ({split})")
        console.print(base.prompt(obs, few_shot=few_shot), markup=False, highlight=False)
        turn, done = 0, False
        while not done:
            turn += 1
            if expert:
                thought, action = base.expert_turn()
                if thought:
                    console.print(f"[cyan]\\[REASON][/] {escape(thought)}", highlight=False)
                console.print(f"[green]\\[ACT][/] {escape(action)}", highlight=False)
            else:
                admissible = info.get("admissible_actions")
                if admissible:
                    console.print(f"[dim]admissible:\n{escape(group_actions(admissible))}[/]", highlight=False)
                try:
                    action = console.input("[bold green]> [/]")
                except (EOFError, KeyboardInterrupt):
                    console.print("\nbye")
                    return
            obs, reward, terminated, truncated, info = env.step(action)
            console.print(obs, markup=False, highlight=False)
            done = terminated or truncated
        verdict = "[green]success[/]" if info.get("success") else "[red]failure[/]"
        console.rule(f"{verdict} after {turn} steps, reward {reward:.3f}"
                     f"{' (truncated)' if truncated and not terminated else ''}")
    finally:
        env.close()


def group_actions(actions: list[str]) -> str:
    """Every admissible action, one line per verb in first-seen order (`go to: cabinet 1, drawer 2`), so that
    none is cut off (the first 20 in alphabetical order used to hide every `take` behind the `go to`s)."""
    verbs = ("go to", "take", "put", "move", "open", "close", "toggle", "heat", "cool", "clean", "slice", "use",
             "examine", "look", "inventory")
    groups: dict[str, list[str]] = {}
    for action in actions:
        verb = next((v for v in verbs if action == v or action.startswith(v + " ")), action.split(" ")[0])
        groups.setdefault(verb, []).append(action[len(verb):].strip())
    return "\n".join(f"  {verb}: {', '.join(a for a in rest if a)}" if any(rest) else f"  {verb}"
                     for verb, rest in groups.items())

