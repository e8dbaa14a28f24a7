"""What `loramix eval` compares, and what each of its results depends on.

Configs (comma-separated; an `option=value` item belongs to the config before it):
  base                     the base model alone
  expert:NAME              one expert alone, on every task (all four give the specialist matrix)
  oracle                   each task's own expert (the paper's "fine-tuned" row)
  uniform                  all experts, weight 1/n each
  prompt                   route once, on the prompt
  tla:k=K                  token-level adaptation, re-routing every K tokens
  arrow                    PEFT's Arrow router over the same experts (a peer baseline)
  paper-table              shorthand for base, oracle, tla:k=1, tla:k=2, tla:k=3, tla:k=4 (old spelling: paper)
Options on any config: decode=cached|recompute, merge=exact|linear|peft04, route=RULE (e.g. route=softmax:0.1).

Every scored item is keyed by what it depends on (base model, the experts and router it uses, the config's
options, the task's generation budget, the model's precision when not fp32): `item_key`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from loramix.baselines import ARROW_SETTINGS
from loramix.bundle import Bundle, BundleFingerprint
from loramix.errors import LoramixError
from loramix.mixture import MERGE_ALIASES, canonical_merge
from loramix.router import canonical_route
from loramix.tasks import get_task

# Every stored key hashes `"scoring": 1` (its name since the first results). A prediction does not depend on how
# it is scored, so a metric change does not change keys (that would regenerate everything): it bumps
# SCORING_VERSION, stamped on each record, and `loramix eval --rescore` re-scores the stored predictions.
KEY_SCORING_FIELD = 1
SCORING_VERSION = 2  # 2: ARC reads only a letter that stands alone; GSM8K normalises numbers as the harness does
PAPER_CONFIGS = "base,oracle,tla:k=1,tla:k=2,tla:k=3,tla:k=4"
EVAL_ROUTE = "paper"  # eval's tla:k=K configs are the paper's method: its routing rule unless route= says otherwise
CONFIGS_HELP = (
    "Comma-separated: base, expert:NAME, oracle, uniform, prompt, tla:k=K, arrow, paper-table (= "
    f"{PAPER_CONFIGS}); options after a config apply to it: decode=, merge=, route=."
)
OPTION_NAMES = ("decode", "merge", "route", "k")
# Which options each config kind depends on, stated once: its name shows them when not the default, and its
# results' cache key holds them.
KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "base": (),
    "arrow": (),
    "expert": ("merge",),
    "oracle": ("merge",),
    "uniform": ("merge",),
    "prompt": ("merge", "route"),
    "tla": ("merge", "route", "k", "decode"),
}


@dataclass(frozen=True)
class EvalConfig:
    kind: str  # base | expert | oracle | uniform | prompt | tla | arrow
    expert: str | None = None
    every_k: int = 2
    decode: str = "cached"
    merge: str = "exact"
    route: str = "paper"

    @classmethod
    def defaults(cls, decode: str, merge: str, route: str) -> EvalConfig:
        """The settings of configs that state none, in the spelling results are named and keyed by."""
        return cls(kind="tla", decode=decode, merge=canonical_merge(merge), route=canonical_route(route))

    @property
    def name(self) -> str:
        if self.kind == "expert":
            label = f"expert:{self.expert}"
        elif self.kind == "tla":
            label = f"tla:k={self.every_k}"
        else:
            label = self.kind
        uses = KIND_OPTIONS[self.kind]
        shown = (("decode", self.decode, "cached"), ("merge", self.merge, "exact"), ("route", self.route, "paper"))
        extras = [f"{name}={value}" for name, value, default in shown if name in uses and value != default]
        return ",".join([label, *extras])

    def route_for(self, task: str, bundle: Bundle) -> str:
        """The --route value this config uses on `task`."""
        if self.kind == "base":
            return "base"
        if self.kind == "expert":
            return f"oracle:{self.expert}"
        if self.kind == "oracle":
            return f"oracle:{oracle_expert(bundle, task)}"
        if self.kind == "uniform":
            return "uniform"
        if self.kind == "prompt":
            return f"prompt:{self.route}"
        return self.route


def oracle_expert(bundle: Bundle, task: str) -> str:
    name = oracle_experts(bundle).get(task)
    if name is None:
        raise LoramixError(f"The bundle has no expert for task '{task}', so the 'oracle' config cannot run on it.")
    return name


def oracle_experts(bundle: Bundle) -> dict[str, str]:
    """Task -> the bundle's expert for it (what `oracle` uses)."""
    chosen: dict[str, str] = {}
    for entry in bundle.experts:  # a task's first expert
        chosen.setdefault(entry.task or entry.name, entry.name)
    return chosen


def parse_configs(spec: str, bundle: Bundle, defaults: EvalConfig | None = None) -> list[EvalConfig]:
    """Parse --configs (see the module docstring)."""
    defaults = defaults or EvalConfig(kind="tla")
    items = []
    for item in (part.strip() for part in spec.split(",")):
        items += PAPER_CONFIGS.split(",") if item in ("paper-table", "paper") else [item] if item else []
    groups: list[list[str]] = []
    for item in items:
        key = item.split("=", 1)[0]
        if "=" in item and ":" not in key and key in OPTION_NAMES and groups:
            groups[-1].append(item)  # an option of the config before it
        else:
            groups.append([item])
    configs = []
    for head, *options in groups:
        name, _, argument = head.partition(":")
        settings: dict = {"decode": defaults.decode, "merge": defaults.merge, "route": defaults.route}
        if argument.startswith("k="):
            options.insert(0, argument)
            argument = ""
        for setting in options:
            key, _, value = setting.partition("=")
            if key in ("merge", "route"):  # the spelling results are named and keyed by
                value = MERGE_ALIASES.get(value, value) if key == "merge" else canonical_route(value)
            if key == "k":
                try:
                    settings["every_k"] = int(value)
                except ValueError:
                    raise LoramixError(f"Config '{head}': k must be a whole number, got '{value}'.") from None
            else:
                settings[key] = value
        if name == "expert":
            if argument not in bundle.expert_names:
                raise LoramixError(
                    f"Config '{head}': no expert '{argument}'; the experts are {', '.join(bundle.expert_names)}."
                )
            configs.append(EvalConfig(kind="expert", expert=argument, **settings))
        elif name in ("base", "oracle", "uniform", "prompt", "arrow", "tla") and not argument:
            if name == "tla" and "every_k" not in settings:
                raise LoramixError("Config 'tla' needs k, e.g. tla:k=2.")
            configs.append(EvalConfig(kind=name, **settings))
        else:
            raise LoramixError(
                f"Unknown config '{head}'; use base, expert:NAME, oracle, uniform, prompt, tla:k=K, arrow or paper."
            )
    for config in configs:
        if config.every_k <= 0:
            raise LoramixError(f"Config '{config.name}': k must be positive.")
        if config.decode not in ("cached", "recompute"):
            raise LoramixError(f"Config '{config.name}': decode must be cached or recompute.")
        try:
            canonical_merge(config.merge)
        except LoramixError as exc:
            raise LoramixError(f"Config '{config.name}': {exc}") from None
    return list(dict.fromkeys(configs))  # drop repeats, keep order


# ---- what a result depends on ----


def generation_budget(task: str, cap: int | None) -> int:
    budget = get_task(task).max_new_tokens
    return min(budget, cap) if cap else budget


def item_key(
    config: EvalConfig, task: str, bundle: Bundle, fingerprint: BundleFingerprint, split: str, cap: int | None = None,
    hub_data: str | None = None, model_dtype: str = "fp32",
) -> str:  # fmt: skip
    """A hash of everything an item's result depends on, and nothing else (so changes redo only what they touch).
    The model's precision is added only when it is not fp32, so every fp32 result keeps its key."""
    spec = get_task(task)
    parts: dict = {
        "task": task,
        "split": split,
        "budget": generation_budget(task, cap),
        "stop": spec.stop,
        "scoring": KEY_SCORING_FIELD,
        "base": fingerprint.base,
    }
    if hub_data is not None:  # data from the Hub: never the same items as the data folder's (added only here)
        parts["data"] = hub_data
    if model_dtype != "fp32":  # bf16 and fp16 items never mix with fp32 ones (added only here)
        parts["dtype"] = model_dtype
    if config.kind != "base":
        used = (
            [config.route_for(task, bundle).split(":", 1)[1]]
            if config.kind in ("expert", "oracle")
            else list(fingerprint.experts)
        )
        parts["experts"] = [fingerprint.experts[name] for name in used]
    uses = KIND_OPTIONS[config.kind]
    if "merge" in uses:
        parts["merge"] = config.merge
    if "route" in uses:
        parts |= {"router": fingerprint.router, "route": config.route_for(task, bundle)}
        if config.route.startswith("hidden"):  # added only here, so every other key stays as it was
            parts["hidden_router"] = fingerprint.hidden_router
    if "k" in uses:
        parts |= {"k": config.every_k, "decode": config.decode}
    if config.kind == "arrow":
        parts["arrow"] = ARROW_SETTINGS
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
