"""The plugin's configuration: one object, three sources, one resolver.

Sources, highest precedence first:

1. ``vllm serve`` flags: ``--sparsity-p``, ``--sparsity-target``, ``--sparsity-backend``,
   ``--sparsity-rule``, ``--sparsity-q``, ``--sparsity-mode``;
2. ``--additional-config '{"sparsity": {"p": 0.9, "target": "all_inputs", "backend": "auto",
   "rule": "top-p", "mode": "exact"}}'`` (also ``LLM(..., additional_config={"sparsity": {...}})``
   offline);
3. environment variables ``VLLM_SPARSITY_P``, ``VLLM_SPARSITY_TARGET``, ``VLLM_SPARSITY_BACKEND``,
   ``VLLM_SPARSITY_RULE``, ``VLLM_SPARSITY_Q``, ``VLLM_SPARSITY_MODE``.

p is one number for every site of the target, or one per site: ``input=0.95,intermediate=0.85``
(flags, environment) or ``{"input": 0.95, "intermediate": 0.85}`` (additional_config, the route).

Each field is taken from the highest source that sets it. The resolved values are written back into
``VllmConfig.additional_config["sparsity"]``, which vLLM ships to the engine core and every worker
and includes in its compilation-cache hash; workers read nothing else. Beside it,
``additional_config["sparsity_metrics"]`` says whether the workers keep the metrics counters
(from ``VLLM_SPARSITY_METRICS_INTERVAL_S`` unless given; see ``with_resolved_sparsity``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from vllm_sparsity import backends, rule, sites

TARGETS: tuple[str, ...] = tuple(sites.TARGETS)
SITES: tuple[str, ...] = tuple(sites.SITES)
BACKENDS: tuple[str, ...] = ("auto", *backends.BACKENDS)
RULES: tuple[str, ...] = tuple(rule.RULES)
# exact: the rule at every batch size; speed: no rule where the crossover sends a step to the
# dense GEMM (see ``SparsityConfig.mode``).
MODES: tuple[str, ...] = ("exact", "speed")
ADDITIONAL_CONFIG_KEY = "sparsity"
ENV_PREFIX = "VLLM_SPARSITY_"
FIELDS = ("p", "target", "backend", "rule", "q", "mode")
TARGET_CHOICES = f"one of {', '.join(TARGETS)} or a comma list of sites ({','.join(SITES)})"

# The metrics switch (not a field: it is no part of the ``/v1/sparsity`` answer).
INTERVAL_ENV = "VLLM_SPARSITY_METRICS_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0
# How long ``POST /v1/sparsity`` waits for the requests in flight to finish (see ``control``).
DRAIN_TIMEOUT_ENV = "VLLM_SPARSITY_DRAIN_TIMEOUT_S"
DEFAULT_DRAIN_TIMEOUT_S = 60.0

# The floor of p. The rule's target is p * (the row's L1 mass, a float64 sum); the smallest positive
# mass a bf16/fp16/fp32 row can have is fp32's smallest subnormal, 2^-149 (about 1.4e-45). From
# p >= 1e-6 the target is then at least about 1.4e-51, far above float64's smallest subnormal
# (about 4.9e-324): it never underflows to 0, which in the kernels (they do not clamp it) would
# make every bin reach the target and the threshold +Inf, zeroing the whole row. Below 1e-6 the
# rule keeps only each row's largest entries anyway, so nothing useful is lost.
P_MIN = 1e-6
P_RANGE = f"[{P_MIN:g}, 1]"
# Rules whose keep-everything p (``rule.KEEP_ALL_P``) lies outside ``P_RANGE`` (max-p: 0) take it
# too, so that every rule can go back to the dense model at run time.
EXTRA_P = {name: p for name, p in rule.KEEP_ALL_P.items() if not P_MIN <= p <= 1.0}
# Error messages quote a bad value up to this many characters (a body may be long).
QUOTE_CHARS = 60
# Bounds of a nonzero interval: each poll is one RPC through the engine core to every worker, so a
# tiny interval means back-to-back RPCs between steps; past an hour the series are useless.
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.5, 3600.0
# additional_config key holding whether the workers instrument the graph (process 0 writes it from
# the environment; it is part of vLLM's compile-cache hash, as the graph differs).
METRICS_KEY = "sparsity_metrics"


class SparsityConfigError(ValueError):
    """A configuration value is out of range; the message names where it came from."""


@dataclass(frozen=True)
class SparsityConfig:
    """Top-p activation sparsity settings (Szatkowski et al., "Universal Properties of Activation
    Sparsity in Modern LLMs", Sec. 3: the top-p rule and its input targets).

    Attributes:
        p: the rule's parameter, in [``P_MIN``, 1] (``P_MIN`` = 1e-6, the floor at which the rule's
            float64 target cannot underflow), or the rule's keep-everything p where that lies
            outside (max-p: 0, ``EXTRA_P``): one float for every site of the target, or a dict
            {site: p} naming exactly the target's sites. Its meaning is the rule's: for top-p the
            share of each token's L1 activation mass kept (``p = 1`` keeps every nonzero entry:
            output equals the dense model), for lq the share of the L_q mass, for top-k the kept
            fraction of K, for max-p the fraction of the row's largest magnitude (``p = 0`` keeps
            every nonzero entry, ``p = 1`` only the largest). Lower ``p`` zeroes more entries for
            top-p, top-k and lq, fewer for max-p.
        target: the sites of each gated MLP the rule applies to (``sites``): ``"input"`` (the
            MLP input feeding ``gate_up_proj``), ``"intermediate"`` (the act-and-mul output feeding
            ``down_proj``), ``"all_inputs"`` (both), or a comma list of sites, e.g.
            ``"gate,intermediate"`` (``gate`` and ``up`` are analysis-only sites).
        backend: ``"torch"`` (the exact torch rule, any device), ``"triton"`` (the input-sparse
            Triton kernels, CUDA only), ``"cpu"`` (the C++ input-sparse kernels, x86-64 with
            AVX2 or AVX-512) or ``"auto"`` (per layer, the first of ``backends.AUTO`` that serves
            it: triton on CUDA, cpu on a CPU that has the kernels, torch elsewhere). The cpu and
            triton kernels implement top-p only: ``auto`` picks torch for any other rule.
        rule: a key of ``rule.RULES``: ``"top-p"`` (default), ``"top-k"``, ``"max-p"`` or
            ``"lq"`` (paper Sec. 3 and App. A). Fixed at start-up (compiled into the graph).
        q: the L_q exponent, a finite number > 0, for ``rule="lq"`` only (None otherwise).
        mode: ``"exact"`` (default: the rule at every step) or ``"speed"``: on the layers of a
            kernel backend (cpu, triton), a step with more rows (tokens) than the layer's
            crossover, which the dense GEMM serves, skips the rule altogether, so that layer is
            dense for that step. The same prompt may then get sparse or dense MLPs depending on
            the batch it shares. The torch backend has no sparse GEMM and keeps the rule at every
            step in both modes. Fixed at start-up.
    """

    p: float | dict[str, float]
    target: str = "all_inputs"
    backend: str = "auto"
    rule: str = "top-p"
    q: float | None = None
    mode: str = "exact"

    def __post_init__(self) -> None:
        _check_choice(self.rule, RULES, "rule")
        _check_choice(self.mode, MODES, "mode")
        _check_choice(self.backend, BACKENDS, "backend")
        object.__setattr__(self, "p", parse_p_sites(self.p, "p", strings=False,
                                                    rule_name=self.rule))
        object.__setattr__(self, "target", parse_target(self.target, "target"))
        if self.q is not None:
            object.__setattr__(self, "q", parse_q(self.q, "q", strings=False))
        check_together(self.p, self.target, self.backend, self.rule, self.q, lambda f: f)

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites the target sparsifies, in model order (``sites.sites_of``)."""
        return sites.sites_of(self.target)

    def p_of(self, site: str) -> float:
        """p at ``site``: the config's p (the site's own when p is per site) on the target's
        sites; elsewhere the rule's p that keeps every nonzero (``rule.KEEP_ALL_P``: 1, or 0
        for max-p). The one place that says which p a site runs at."""
        if site not in self.sites:
            return rule.KEEP_ALL_P[self.rule]
        return self.p[site] if isinstance(self.p, dict) else self.p

    def with_changes(self, **changes: Any) -> SparsityConfig:
        """A copy with ``changes`` applied (None values leave a field as it is), validated."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> SparsityConfig | None:
        """The resolved config that process 0 stored in ``VllmConfig.additional_config``, or None
        when sparsity is off."""
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) if isinstance(
            additional_config, Mapping
        ) else None
        if not section or section.get("p") is None:
            return None
        return cls(**{k: section[k] for k in FIELDS if k in section})


def resolve(
    flags: Mapping[str, Any] | None = None,
    additional_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> SparsityConfig | None:
    """Merge the three sources (flags > additional_config > environment) into one config.

    Args:
        flags: ``{"p", "target", "backend", "rule", "q", "mode"}`` from the ``--sparsity-*``
            flags; None values are unset.
        additional_config: vLLM's ``additional_config`` dict; its ``"sparsity"`` section is read.
        environ: environment (default ``os.environ``); ``VLLM_SPARSITY_*`` variables are read.

    Returns:
        The config, or None when no source sets ``p`` (the plugin is off).

    Raises:
        SparsityConfigError: a value is malformed or out of range, or the ``sparsity`` section has
            an unknown key. The message names the flag, field or variable and the allowed values.
    """
    environ = os.environ if environ is None else environ
    section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if section is None:  # absent or null: unset, like any other field
        section = {}
    if not isinstance(section, Mapping):  # [], false, 0, "off": an error, not a silent "off"
        raise SparsityConfigError(
            f"--additional-config: 'sparsity' must be an object with keys {list(FIELDS)} "
            f"(leave it out to turn sparsity off), got {quote(section)}"
        )
    unknown = sorted(set(section) - set(FIELDS))
    if unknown:
        raise SparsityConfigError(
            f"--additional-config: unknown key(s) {unknown} in 'sparsity'; allowed: {list(FIELDS)}"
        )

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for field in FIELDS:
        flag_value = (flags or {}).get(field)
        env_name = ENV_PREFIX + field.upper()
        if flag_value is not None:
            values[field], origin[field] = flag_value, f"--sparsity-{field}"
        elif section.get(field) is not None:
            values[field] = section[field]
            origin[field] = f"--additional-config sparsity.{field}"
        elif environ.get(env_name, "") != "":
            values[field], origin[field] = environ[env_name], env_name

    if "p" not in values:
        extra = sorted(origin.values())
        if extra:
            raise SparsityConfigError(
                f"{', '.join(extra)} given without p: set --sparsity-p (a number in {P_RANGE}) "
                "to turn sparsity on"
            )
        return None
    for field, choices in (("backend", BACKENDS), ("rule", RULES), ("mode", MODES)):
        if field in values:
            _check_choice(values[field], choices, origin[field])
    values["p"] = parse_p_sites(values["p"], origin["p"],
                                rule_name=values.get("rule", SparsityConfig.rule))
    if "target" in values:
        values["target"] = parse_target(values["target"], origin["target"])
    elif isinstance(values["p"], dict):  # p per site and no target: the sites p names
        values["target"] = sites.target_of(values["p"])
    if "q" in values:
        values["q"] = parse_q(values["q"], origin["q"])
    defaults = SparsityConfig.__dataclass_fields__
    check_together(values["p"], values.get("target", defaults["target"].default),
                   values.get("backend", defaults["backend"].default),
                   values.get("rule", defaults["rule"].default), values.get("q"),
                   lambda f: origin.get(f, f"--sparsity-{f}"))
    return SparsityConfig(**values)


def check_together(p: float | dict[str, float], target: str, backend: str, rule_name: str,
                   q: float | None, name: Callable[[str], str]) -> None:
    """The checks that involve two fields (each field already valid alone): q only with lq, and
    lq needs q; a kernel backend (``backends.TOP_P_ONLY``) runs top-p only; a per-site p names
    exactly the target's sites. ``name(field)`` is how the message names a field (flag, key or
    variable). Raises SparsityConfigError."""
    if rule_name == "lq" and q is None:
        raise SparsityConfigError(f"{name('rule')} lq needs {name('q')} (the L_q exponent, a "
                                  "finite number > 0)")
    if rule_name != "lq" and q is not None:
        raise SparsityConfigError(f"{name('q')} is the exponent of the lq rule only; "
                                  f"{name('rule')} is {rule_name}: drop {name('q')} or use lq")
    if backend in backends.TOP_P_ONLY and rule_name != "top-p":
        raise SparsityConfigError(
            f"{name('backend')} {backend} implements the top-p rule only; {name('rule')} is "
            f"{rule_name}: use the torch backend (or auto, which picks it)")
    if isinstance(p, dict):
        want = sites.sites_of(target)
        if tuple(p) != want:
            raise SparsityConfigError(
                f"{name('p')} gives p for the sites {', '.join(p)} but {name('target')} "
                f"{target} has the sites {', '.join(want)}: name exactly the target's sites "
                "(or leave the target out: it is then the sites p names)")


def parse_target(value: Any, name: str) -> str:
    """``value`` as a canonical target (``sites.target_of``): a key of ``TARGETS`` or a comma list
    of sites. Raises SparsityConfigError naming ``name`` and the allowed values."""
    try:
        return sites.target_of(sites.sites_of(value))
    except ValueError:
        raise SparsityConfigError(f"{name} must be {TARGET_CHOICES}; got {quote(value)}") from None


def parse_p_sites(value: Any, name: str = "--sparsity-p", strings: bool = True,
                  rule_name: str | None = "top-p") -> float | dict[str, float]:
    """p as one float for every site, or per site: a dict {site: p} (its keys in model order),
    from a mapping, or (``strings``) from ``"input=0.95,intermediate=0.85"``. Each p goes through
    ``parse_p`` (``rule_name`` as there). Raises SparsityConfigError naming ``name``, the site and
    the allowed values."""
    if isinstance(value, str) and strings and "=" in value:
        pairs = [item.partition("=") for item in value.split(",")]
        if any(not eq for _, eq, _ in pairs):
            raise SparsityConfigError(
                f"{name} must be a number in {P_RANGE} or SITE=P pairs separated by commas "
                f"(SITE in {', '.join(SITES)}), got {quote(value)}")
        keys = [site.strip() for site, _, _ in pairs]
        if len(set(keys)) != len(keys):
            raise SparsityConfigError(f"{name} names a site twice, got {quote(value)}")
        value = {site: p.strip() for site, (_, _, p) in zip(keys, pairs)}
    if not isinstance(value, Mapping):
        return parse_p(value, name, strings, rule_name)
    if not value:
        raise SparsityConfigError(f"{name} must name at least one site of {', '.join(SITES)}")
    unknown = [site for site in value if site not in SITES]
    if unknown:
        raise SparsityConfigError(f"{name}: unknown site {quote(unknown[0])}; sites: "
                                  f"{', '.join(SITES)}")
    return {site: parse_p(value[site], f"{name}[{site}]", strings, rule_name)
            for site in SITES if site in value}


def parse_q(value: Any, name: str = "--sparsity-q", strings: bool = True) -> float:
    """``value`` as the L_q exponent: a finite number > 0 (strings parsed when ``strings``).
    Raises SparsityConfigError naming ``name``."""
    number = value
    if isinstance(value, str) and strings:
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) \
            or not 0 < number < math.inf:
        raise SparsityConfigError(f"{name} must be a finite number > 0 (the L_q exponent), "
                                  f"got {quote(value)}")
    return float(number)


def describe_p(p: float | dict[str, float]) -> str:
    """p for logs and messages: ``0.9`` or ``input=0.95,intermediate=0.85``."""
    if isinstance(p, dict):
        return ",".join(f"{site}={value:g}" for site, value in p.items())
    return f"{p:g}"


def parse_p(value: Any, name: str = "--sparsity-p", strings: bool = True,
            rule_name: str | None = "top-p") -> float:
    """``value`` as a float in [``P_MIN``, 1], or the keep-everything p of ``rule_name`` where that
    lies outside (``EXTRA_P``: 0 for max-p; None: any rule's, for a caller that checks the rule
    later): the one check of p, for every source (flags, environment, additional_config, the
    config object, the ``/v1/sparsity`` route and ``vllm_xargs.sparsity_p``). Strings are parsed
    when ``strings`` (flags, environment, additional_config), refused otherwise (JSON bodies, the
    config object). Raises SparsityConfigError naming ``name``, the allowed values and the value
    as given (``quote``: at most ``QUOTE_CHARS`` characters of it)."""
    extra = {r: p for r, p in EXTRA_P.items() if rule_name in (None, r)}
    number = value
    if isinstance(value, str) and strings:
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or math.isnan(number) \
            or not (P_MIN <= number <= 1.0 or number in extra.values()):
        also = "".join(f"; under the {r} rule also {p:g} (keeps every nonzero)"
                       for r, p in extra.items())
        raise SparsityConfigError(f"{name} must be a number in {P_RANGE}, got {quote(value)}"
                                  f"{also}")
    return float(number) + 0.0  # -0.0 taken as 0


def quote(value: Any) -> str:
    """``repr(value)``, cut to ``QUOTE_CHARS`` characters (with its full length) when longer: error
    messages never echo a long input back whole."""
    text = repr(value)
    if len(text) <= QUOTE_CHARS:
        return text
    return f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


def _check_choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise SparsityConfigError(
            f"{name} must be one of {', '.join(choices)}; got {quote(value)}")


def _env_seconds(environ: Mapping[str, str] | None, name: str, default: float
                 ) -> tuple[str, float]:
    """The variable's raw text and its value in seconds: ``default`` when unset or empty, NaN when
    not a number (every caller's range check then fails and names the raw text)."""
    raw = (os.environ if environ is None else environ).get(name, "")
    if raw == "":
        return raw, default
    try:
        return raw, float(raw)
    except ValueError:
        return raw, math.nan


def interval_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between two polls of the workers' metrics, from ``VLLM_SPARSITY_METRICS_INTERVAL_S``:
    0 (metrics off) or in [MIN_INTERVAL_S, MAX_INTERVAL_S] = [0.5, 3600]; default 5. Raises
    SparsityConfigError naming the variable and the allowed range."""
    raw, value = _env_seconds(environ, INTERVAL_ENV, DEFAULT_INTERVAL_S)
    if value != 0 and not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:  # NaN fails both
        raise SparsityConfigError(
            f"{INTERVAL_ENV} must be 0 (metrics off) or a number of seconds in "
            f"[{MIN_INTERVAL_S:g}, {MAX_INTERVAL_S:g}], got {raw!r}")
    return value or 0.0  # -0 is 0


def drain_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds ``POST /v1/sparsity`` waits for the requests in flight to finish before it gives up
    (HTTP 503, nothing changed), from ``VLLM_SPARSITY_DRAIN_TIMEOUT_S`` (default 60, range
    (0, 86400]). Raises SparsityConfigError naming the variable."""
    raw, value = _env_seconds(environ, DRAIN_TIMEOUT_ENV, DEFAULT_DRAIN_TIMEOUT_S)
    if not 0 < value <= 86400:
        raise SparsityConfigError(f"{DRAIN_TIMEOUT_ENV} must be a number of seconds in (0, 86400], "
                                  f"got {quote(raw)}")
    return value


def metrics_enabled(additional_config: Any) -> bool:
    """Whether the workers instrument the graph (``additional_config["sparsity_metrics"]``, which
    process 0 sets from ``VLLM_SPARSITY_METRICS_INTERVAL_S`` unless given)."""
    if not isinstance(additional_config, Mapping):
        return False
    return bool(additional_config.get(METRICS_KEY, False))


def with_resolved_sparsity(additional_config: Mapping[str, Any] | None,
                           flags: Mapping[str, Any] | None = None,
                           environ: Mapping[str, str] | None = None) -> dict:
    """``additional_config`` with its ``"sparsity"`` section replaced by the resolved config
    (absent when sparsity is off) and its ``"sparsity_metrics"`` switch set (given, or from
    ``VLLM_SPARSITY_METRICS_INTERVAL_S``: 0 = off). Idempotent. Raises ``SparsityConfigError``."""
    environ = os.environ if environ is None else environ
    additional_config = dict(additional_config or {})
    resolved = resolve(flags, additional_config, environ)
    additional_config.pop(ADDITIONAL_CONFIG_KEY, None)
    if resolved is None:
        additional_config.pop(METRICS_KEY, None)
        return additional_config
    additional_config[ADDITIONAL_CONFIG_KEY] = resolved.to_dict()
    on = additional_config.get(METRICS_KEY)
    if not isinstance(on, bool):
        if on is not None:
            raise SparsityConfigError(
                f"--additional-config: {METRICS_KEY} must be true or false, got {quote(on)}")
        on = interval_s(environ) > 0
    additional_config[METRICS_KEY] = on
    return additional_config
