"""Precision policies for HBFP training: which formats each GEMM layer uses, per role and
over training (contract §6).

A policy is a list of **phases**, each starting at a fraction of the total steps; a phase
is a list of **rules** plus an optional weight-**storage** format. A rule maps module
path patterns to the formats and rounding of the three GEMM roles (`fwd`, `dlhs`,
`drhs`, see `coltrain.numerics.dot`). For each GEMM layer (flax `Dense`, `DenseGeneral`,
`Conv` and subclasses) the **first matching rule** of the current phase applies; a layer
matching no rule stays fp32. Rules do not carry over between phases (each phase lists its
own); storage does (a phase without `@storage` keeps the previous phase's storage; the
first phase defaults to none = fp32 master weights).

Patterns
  fnmatch patterns over the '/'-joined flax module path, e.g. `head`, `conv*`,
  `stage*/conv0`, `*` (note: fnmatch's `*` also crosses '/'). Special tokens: `@first`
  and `@last`, the first and last GEMM layer in call order (order of first call, found by
  tracing the model once abstractly with jax.eval_shape). `resolve` raises ValueError if a
  pattern matches no layer.

Operand, pair and role formats
  operand  := FORMAT [ '~' ROUNDING ]        e.g. bfp8, bfp8_b32~sr, mxfp8_e5m2~ne
              FORMAT: any contract §7 name (fp32 = not quantized). ROUNDING: nearest_even
              | stochastic | toward_zero, or ne | sr | tz.
              **Default rounding** when omitted: `stochastic` for the gradient operand dY
              (lhs of dlhs, rhs of drhs), `nearest_even` for everything else (the HBFP
              convention).
  pair     := operand [ '/' operand ]        lhs/rhs of one GEMM; one operand = both.
  formats  := pair                           the same pair for all three roles
            | entry ( ',' entry )*           entry := KEY ':' value
              KEY fwd | dlhs | drhs sets that role (value: a pair);
              KEY x | w | dy sets that tensor wherever it is an operand (value: an
              operand): x in fwd(lhs), drhs(lhs); w in fwd(rhs), dlhs(rhs); dy in
              dlhs(lhs), drhs(rhs). Role keys override tensor keys; operands given by
              neither are fp32.
  e.g. `bfp8` (all operands bfp8_b64, dY stochastic), `x:mxfp8_e4m3,w:mxfp8_e4m3,
  dy:mxfp8_e5m2~ne`, `fwd:bfp6,dlhs:bfp8,drhs:bfp8~ne/bfp8~sr`.

Compact string form (command line):
  policy := phase ( '|' phase )*
  phase  := [ FRACTION ':' ] item ( ';' item )*      (first phase: fraction 0, implied)
  item   := PATTERN ( ',' PATTERN )* '=' formats  |  '@storage=' FORMAT
  e.g. `@first,@last=bfp6;*=bfp4;@storage=bfp16|0.9:*=bfp6` (= preset hbfp4_booster).
  A preset name is also accepted.

Python (config) form: a tuple of phases `(start_fraction, items)`, items a tuple of
`(patterns, formats)` with patterns a string (comma-separated allowed) or a tuple of
strings, formats a string as above or a dict {KEY: value} with values strings or tuples
(pair: (lhs, rhs); operand: (FORMAT, ROUNDING)); storage is the item
`("@storage", FORMAT)`. E.g.
  ((0.0, (("@first,@last", "bfp6"), ("*", "bfp4"), ("@storage", "bfp16"))),
   (0.9, (("*", "bfp6"),)))

Presets (`PRESETS`):
  fp32           no rules (nothing quantized), no storage quantization.
  hbfp8_16       `*=bfp8;@storage=bfp16`: bfp8 block 64 for every operand of every
                 role, dY rounded stochastically (in dlhs and drhs), nearest_even
                 elsewhere; weights stored as bfp16_b64.
  hbfp4_16       the same with bfp4.
  hbfp4_booster  Accuracy Boosters: bfp4 everywhere except bfp6 in `@first` and `@last`;
                 bfp6 everywhere over the last 10% of steps; bfp16 storage.
  mxfp8          mxfp8_e4m3 (block 32) for activations and weights (X, W in every role),
                 mxfp8_e5m2 for the gradient dY (dlhs, drhs); nearest_even everywhere;
                 no storage quantization (fp32 master weights, as in MX training).
  mxint8         mxint8 (bfp8, block 32) for every operand, nearest_even everywhere; no
                 storage quantization.

Steps: phase k covers steps s with ceil(f_k · T) <= s < ceil(f_{k+1} · T) for T total
steps (fractions taken as exact decimals), so "0.9" of 100 steps starts at step 90.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax

from coltrain.numerics.dot import ROLES, DotSpec, GemmSpec
from coltrain.numerics.formats import Format, parse_format
from coltrain.numerics.rounding import ROUNDING_MODES

ROUNDING_ALIASES = {"ne": "nearest_even", "sr": "stochastic", "tz": "toward_zero"}
TENSOR_KEYS = ("x", "w", "dy")
# Which tensor is each role's (lhs, rhs) operand.
ROLE_TENSORS = {"fwd": ("x", "w"), "dlhs": ("dy", "w"), "drhs": ("x", "dy")}
SPECIAL_PATTERNS = ("@first", "@last")
STORAGE_TOKEN = "@storage"

PRESETS: dict[str, str] = {
    "fp32": "",
    "hbfp8_16": "*=bfp8;@storage=bfp16",
    "hbfp4_16": "*=bfp4;@storage=bfp16",
    "hbfp4_booster": "@first,@last=bfp6;*=bfp4;@storage=bfp16|0.9:*=bfp6",
    "mxfp8": "*=x:mxfp8_e4m3~ne,w:mxfp8_e4m3~ne,dy:mxfp8_e5m2~ne",
    "mxint8": "*=mxint8~ne",
}


class PolicyError(ValueError):
  """A malformed policy (a ValueError)."""


# ---------------------------------------------------------------------------------------
# Data model

@dataclasses.dataclass(frozen=True)
class Rule:
  """Patterns -> the three roles' GemmSpecs (datapath-independent)."""

  patterns: tuple[str, ...]
  fwd: GemmSpec
  dlhs: GemmSpec
  drhs: GemmSpec
  text: str = ""

  @property
  def is_fp32(self) -> bool:
    return all(getattr(self, r).is_fp32 for r in ROLES)

  def dot_spec(self, datapath: str, backend: str, hw_plugin: str = "") -> Optional[DotSpec]:
    """The layer's DotSpec, or None for an all-fp32 rule (the layer is left alone)."""
    if self.is_fp32:
      return None
    return DotSpec(self.fwd, self.dlhs, self.drhs, datapath=datapath, backend=backend,
                   hw_plugin=hw_plugin)


@dataclasses.dataclass(frozen=True)
class Phase:
  start: Fraction
  rules: tuple[Rule, ...]
  storage: Optional[Format]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """A GEMM layer found by tracing: its path, kind ('dense'/'conv'), flax class name,
  and for dense layers the number of leading kernel dims that are contracted."""

  path: str
  kind: str
  module_type: str
  kernel_in_dims: int = 1
  quantizable: bool = True
  why_not: str = ""


# ---------------------------------------------------------------------------------------
# Parsing

def _rounding(r: str, where: str) -> str:
  r = ROUNDING_ALIASES.get(r.strip(), r.strip())
  if r not in ROUNDING_MODES:
    raise PolicyError(f"{where}: unknown rounding {r!r}; expected one of "
                      f"{', '.join(ROUNDING_MODES)} (or ne, sr, tz)")
  return r


def _format(f: Any, where: str) -> Format:
  try:
    return parse_format(f.strip() if isinstance(f, str) else f)
  except ValueError as e:
    raise PolicyError(f"{where}: {e}") from None


def _operand(v: Any, where: str) -> tuple[Format, Optional[str]]:
  """'FMT[~ROUNDING]' or (FMT, ROUNDING) -> (Format, rounding or None for default)."""
  if isinstance(v, (tuple, list)):
    if len(v) != 2:
      raise PolicyError(f"{where}: an operand tuple must be (format, rounding), got {v!r}")
    return _format(v[0], where), _rounding(str(v[1]), where)
  if not isinstance(v, str) or not v.strip():
    raise PolicyError(f"{where}: expected an operand 'FORMAT[~ROUNDING]', got {v!r}")
  fmt, sep, rnd = v.partition("~")
  return _format(fmt, where), (_rounding(rnd, where) if sep else None)


def _is_rounding(v: Any) -> bool:
  return isinstance(v, str) and v.strip() in ROUNDING_MODES + tuple(ROUNDING_ALIASES)


def _pair(v: Any, where: str):
  """'OP[/OP]' or (OP, OP) or one operand (also (FMT, ROUNDING)) -> (lhs, rhs) operands."""
  if isinstance(v, (tuple, list)) and len(v) == 2 and not _is_rounding(v[1]):
    return _operand(v[0], where), _operand(v[1], where)
  if isinstance(v, str) and "/" in v:
    a, b = v.split("/", 1)
    return _operand(a, where), _operand(b, where)
  op = _operand(v, where)
  return op, op


def _default_rounding(role: str, side: int) -> str:
  return "stochastic" if ROLE_TENSORS[role][side] == "dy" else "nearest_even"


def _roles(v: Any, where: str) -> tuple[GemmSpec, GemmSpec, GemmSpec]:
  """A rule's formats (string or dict) -> (fwd, dlhs, drhs) GemmSpecs."""
  entries: Optional[dict] = None
  if isinstance(v, Mapping):
    entries = dict(v)
  elif isinstance(v, str) and ":" in v:
    entries = {}
    for part in v.split(","):
      key, sep, val = part.partition(":")
      key = key.strip()
      if not sep or not key:
        raise PolicyError(f"{where}: expected KEY:VALUE entries (KEY one of "
                          f"{', '.join(ROLES + TENSOR_KEYS)}), got {part!r}")
      if key in entries:
        raise PolicyError(f"{where}: {key!r} given twice")
      entries[key] = val
  if entries is None:
    (fa, ra), (fb, rb) = _pair(v, where)
    return tuple(GemmSpec(fa, fb, ra or _default_rounding(r, 0), rb or _default_rounding(r, 1))
                 for r in ROLES)
  bad = [k for k in entries if k not in ROLES + TENSOR_KEYS]
  if bad:
    raise PolicyError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; expected "
                      f"role keys {', '.join(ROLES)} or tensor keys {', '.join(TENSOR_KEYS)}")
  tensors = {k: _operand(entries[k], f"{where} ({k})") for k in TENSOR_KEYS if k in entries}
  out = []
  for r in ROLES:
    if r in entries:
      ops = _pair(entries[r], f"{where} ({r})")
    else:
      ops = tuple(tensors.get(t, (parse_format("fp32"), None)) for t in ROLE_TENSORS[r])
    (fa, ra), (fb, rb) = ops
    out.append(GemmSpec(fa, fb, ra or _default_rounding(r, 0), rb or _default_rounding(r, 1)))
  return tuple(out)


def _patterns(p: Any, where: str) -> tuple[str, ...]:
  if isinstance(p, str):
    pats = tuple(s.strip() for s in p.split(","))
  elif isinstance(p, (tuple, list)) and all(isinstance(s, str) for s in p):
    pats = tuple(s.strip() for s in p)
  else:
    raise PolicyError(f"{where}: patterns must be a string or a tuple of strings, got {p!r}")
  if not pats or any(not s for s in pats):
    raise PolicyError(f"{where}: empty module path pattern in {p!r}")
  for s in pats:
    if s.startswith("@") and s not in SPECIAL_PATTERNS:
      raise PolicyError(f"{where}: unknown special pattern {s!r}; special tokens are "
                        f"{', '.join(SPECIAL_PATTERNS)} (and {STORAGE_TOKEN}=FORMAT as an "
                        f"item of its own)")
  return pats


def _fraction(f: Any, where: str) -> Fraction:
  if isinstance(f, bool) or not isinstance(f, (int, float, str, Fraction)):
    raise PolicyError(f"{where}: phase start must be a number in [0, 1), got {f!r}")
  try:
    fr = Fraction(f) if isinstance(f, (str, Fraction)) else Fraction(repr(float(f)))
  except (ValueError, ZeroDivisionError):
    raise PolicyError(f"{where}: phase start must be a number in [0, 1), got {f!r}") from None
  if not 0 <= fr < 1:
    raise PolicyError(f"{where}: phase start must be in [0, 1), got {f!r}")
  return fr


_PHASE_PREFIX = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*:(.*)", re.S)


def parse_compact(text: str) -> tuple:
  """The compact string form -> the Python (config) form (see module doc)."""
  phases = []
  for i, chunk in enumerate(text.split("|")):
    where = f"phase {i}"
    m = _PHASE_PREFIX.fullmatch(chunk)
    if m:
      start, body = m.group(1), m.group(2)
    elif i == 0:
      start, body = "0", chunk
    else:
      raise PolicyError(f"{where} ({chunk.strip()!r}): phases after the first need a "
                        f"start fraction, e.g. '0.9:*=bfp6'")
    items = []
    for item in body.split(";"):
      if not item.strip():
        continue
      pats, sep, fmts = item.partition("=")
      if not sep:
        raise PolicyError(f"{where}: item {item.strip()!r} is not PATTERNS=FORMATS or "
                          f"{STORAGE_TOKEN}=FORMAT")
      items.append((pats.strip(), fmts.strip()))
    phases.append((start, tuple(items)))
  return tuple(phases)


def _build_phases(spec: Any, datapath: str, backend: str,
                  hw_plugin: str = "") -> tuple[Phase, ...]:
  if not isinstance(spec, (tuple, list)) or not spec:
    raise PolicyError(f"a policy must be a preset name, a compact string or a non-empty "
                      f"tuple of (start_fraction, items) phases; got {spec!r}")
  phases = []
  storage: Optional[Format] = None
  for i, ph in enumerate(spec):
    where = f"phase {i}"
    if not isinstance(ph, (tuple, list)) or len(ph) != 2:
      raise PolicyError(f"{where}: expected (start_fraction, items), got {ph!r}")
    start = _fraction(ph[0], where)
    if i == 0 and start != 0:
      raise PolicyError(f"{where}: the first phase must start at 0, got {ph[0]!r}")
    if i > 0 and start <= phases[-1].start:
      raise PolicyError(f"{where}: phase starts must increase strictly "
                        f"({float(phases[-1].start)} then {float(start)})")
    items = ph[1]
    if not isinstance(items, (tuple, list)):
      raise PolicyError(f"{where}: items must be a tuple of (patterns, formats), got "
                        f"{items!r}")
    rules = []
    for j, item in enumerate(items):
      w = f"{where}, item {j}"
      if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise PolicyError(f"{w}: expected (patterns, formats), got {item!r}")
      pats, fmts = item
      if isinstance(pats, str) and pats.strip() == STORAGE_TOKEN:
        f = _format(fmts, f"{w} ({STORAGE_TOKEN})")
        storage = None if f.kind == "fp32" else f
        continue
      pats = _patterns(pats, w)
      w = f"{where}, rule {','.join(pats)}"
      if fmts is None or (isinstance(fmts, str) and not fmts.strip()):
        raise PolicyError(f"{w}: missing formats")
      fwd, dlhs, drhs = _roles(fmts, w)
      rule = Rule(pats, fwd, dlhs, drhs, text=f"{','.join(pats)}={_describe(fwd, dlhs, drhs)}")
      try:
        rule.dot_spec(datapath, backend, hw_plugin)
      except ValueError as e:
        raise PolicyError(f"{w}: {e}") from None
      rules.append(rule)
    phases.append(Phase(start, tuple(rules), storage))
  return tuple(phases)


def format_mantissa_bits(fmt: Format) -> int:
  """Mantissa bits including the sign: bfp(m) -> m, MX fp -> man_bits + 1, fp32 -> 24."""
  if fmt.kind == "bfp":
    return fmt.mantissa_bits
  if fmt.kind == "mx":
    return fmt.man_bits + 1
  return 24


def _describe(fwd: GemmSpec, dlhs: GemmSpec, drhs: GemmSpec) -> str:
  return f"fwd:{fwd},dlhs:{dlhs},drhs:{drhs}"


# ---------------------------------------------------------------------------------------
# Policies

@dataclasses.dataclass(frozen=True)
class Policy:
  """A precision policy (hashable). Build with `make_policy`."""

  name: str
  phases: tuple[Phase, ...]
  datapath: str = "fake"
  backend: str = "jax"
  hw_plugin: str = ""  # backend "hw": plugin library ("" = $COLTRAIN_HW_PLUGIN or built-in)
  source: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  @property
  def num_phases(self) -> int:
    return len(self.phases)

  def phase_starts(self, total_steps: int) -> list[int]:
    """First step of each phase: ceil(start_fraction * total_steps)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
      raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    return [math.ceil(p.start * total_steps) for p in self.phases]

  def phase_at(self, step: int, total_steps: int) -> int:
    """Index of the phase that step `step` (0-based) belongs to."""
    starts = self.phase_starts(total_steps)
    return max(i for i, s in enumerate(starts) if s <= max(int(step), 0))

  def storage_format_at(self, phase: int) -> Optional[Format]:
    """Weight-storage format of `phase` (None: float32 master weights)."""
    return self.phases[phase].storage

  @property
  def storage_format(self) -> Optional[Format]:
    """The storage format, when it is the same in every phase (else ValueError)."""
    fmts = {p.storage for p in self.phases}
    if len(fmts) != 1:
      raise ValueError(f"policy {self.name!r} changes its storage format between phases; "
                       f"use storage_format_at(phase)")
    return fmts.pop()

  @property
  def mantissa_bits(self) -> int:
    """Signed mantissa bits of the policy's dominant forward GEMM format, for tables and
    plots: the `fwd` lhs format of the first phase's catch-all rule (pattern `*`, else its
    last rule). bfp(m) -> m (mxint8: 8); MX fp elements -> explicit mantissa bits + sign
    (e4m3: 4, e5m2: 3, e2m1: 2); fp32 (or no rules) -> 24 (23 + sign)."""
    rules = self.phases[0].rules
    if not rules:
      return 24
    rule = next((r for r in rules if "*" in r.patterns), rules[-1])
    return format_mantissa_bits(rule.fwd.lhs)

  @property
  def needs_key(self) -> bool:
    return any(not r.is_fp32 and (r.fwd.stochastic or r.dlhs.stochastic or r.drhs.stochastic)
               for p in self.phases for r in p.rules)

  def describe(self) -> str:
    lines = [f"policy {self.name} [{self.datapath}]"]
    for i, p in enumerate(self.phases):
      st = p.storage or "fp32"
      lines.append(f"  phase {i} from {float(p.start):g}: storage {st}")
      for r in p.rules:
        lines.append(f"    {r.text}")
      if not p.rules:
        lines.append("    (no rules: everything fp32)")
    return "\n".join(lines)

  def resolve(self, model: nn.Module, sample_input, **call_kwargs) -> "ResolvedPolicy":
    """Maps each GEMM layer of `model` to its DotSpec in every phase.

    The model is traced once abstractly (jax.eval_shape of model.init on `sample_input`,
    an array or jax.ShapeDtypeStruct, with `call_kwargs`, e.g. train=False).
    Raises ValueError if a rule pattern matches no layer (the message lists the layer
    paths), or if a quantized rule matches a layer that cannot be quantized.
    """
    layers = trace_layers(model, sample_input, **call_kwargs)
    gemm_layers = [l for l in layers if l.quantizable]
    first = gemm_layers[0].path if gemm_layers else None
    last = gemm_layers[-1].path if gemm_layers else None
    listing = ", ".join(f"{l.path} ({l.module_type})" for l in layers) or "(none)"

    def matches(pattern: str, layer: LayerInfo) -> bool:
      if pattern == "@first":
        return layer.path == first
      if pattern == "@last":
        return layer.path == last
      return fnmatch.fnmatchcase(layer.path, pattern)

    phase_specs = []
    for i, phase in enumerate(self.phases):
      for rule in phase.rules:
        for pat in rule.patterns:
          if not any(matches(pat, l) for l in layers):
            raise ValueError(
                f"policy {self.name!r}, phase {i}: pattern {pat!r} matches no GEMM layer "
                f"of {type(model).__name__}; its layers (call order) are: {listing}")
      specs = []
      for layer in layers:
        rule = next((r for r in phase.rules if any(matches(p, layer) for p in r.patterns)),
                    None)
        if rule is None or rule.is_fp32:
          continue
        if not layer.quantizable:
          raise ValueError(
              f"policy {self.name!r}, phase {i}: rule {rule.text!r} matches layer "
              f"{layer.path} ({layer.module_type}), which cannot be quantized: "
              f"{layer.why_not}. Put an fp32 rule for it first, e.g. "
              f"'{layer.path}=fp32;...'")
        specs.append((layer.path, rule.dot_spec(self.datapath, self.backend,
                                                    self.hw_plugin)))
      phase_specs.append(tuple(specs))
    return ResolvedPolicy(self, tuple(layers), tuple(phase_specs),
                          tuple(p.storage for p in self.phases))


@dataclasses.dataclass(frozen=True)
class ResolvedPolicy:
  """A policy bound to a model: per phase, the DotSpec of each quantized layer path.

  Hashable (usable as a static value). `layers` lists the model's GEMM layers in call
  order; `phase_specs[k]` is a tuple of (path, DotSpec) for phase k (layers absent from
  it run in fp32); `storage[k]` is phase k's weight-storage format (or None).
  """

  policy: Policy
  layers: tuple[LayerInfo, ...]
  phase_specs: tuple[tuple[tuple[str, DotSpec], ...], ...]
  storage: tuple[Optional[Format], ...]

  @property
  def num_phases(self) -> int:
    return len(self.phase_specs)

  def specs(self, phase: int) -> dict[str, DotSpec]:
    self._check_phase(phase)
    return dict(self.phase_specs[phase])

  def spec(self, phase: int, path: str) -> Optional[DotSpec]:
    return self.specs(phase).get(path)

  def needs_key(self, phase: int) -> bool:
    return any(s.needs_key for _, s in self.phase_specs[phase])

  def phase_starts(self, total_steps: int) -> list[int]:
    return self.policy.phase_starts(total_steps)

  def phase_at(self, step: int, total_steps: int) -> int:
    return self.policy.phase_at(step, total_steps)

  def store(self, params, phase: int):
    """Quantizes the kernels of this phase's quantized layers to its storage format."""
    from coltrain.numerics.storage import store_layer_weights
    self._check_phase(phase)
    return store_layer_weights(params, self, phase)

  def describe(self, phase: Optional[int] = None) -> str:
    phases = range(self.num_phases) if phase is None else [phase]
    lines = []
    for k in phases:
      specs = self.specs(k)
      lines.append(f"phase {k} (from {float(self.policy.phases[k].start):g}), storage "
                   f"{self.storage[k] or 'fp32'}:")
      for l in self.layers:
        lines.append(f"  {l.path:32s} {specs[l.path] if l.path in specs else 'fp32'}")
    return "\n".join(lines)

  def _check_phase(self, phase: int):
    if not isinstance(phase, int) or not 0 <= phase < self.num_phases:
      raise ValueError(f"phase must be an int in [0, {self.num_phases}), got {phase!r}")


# ---------------------------------------------------------------------------------------
# Layer discovery

UNSUPPORTED_MODULES = (nn.Einsum, nn.ConvTranspose, nn.ConvLocal)


def module_kind(module) -> Optional[str]:
  """'dense' for Dense/DenseGeneral, 'conv' for Conv (and subclasses), else None."""
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return "dense"
  if isinstance(module, nn.Conv):
    return "conv"
  return None


def trace_layers(model: nn.Module, sample_input, **call_kwargs) -> tuple[LayerInfo, ...]:
  """GEMM layers of `model` in order of first call (abstract trace of model.init)."""
  found: dict[str, LayerInfo] = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__":
      path = "/".join(m.path)
      kind = module_kind(m)
      if path not in found:
        if kind == "dense":
          why = ""
          n_in = 1
          if isinstance(m, nn.DenseGeneral):
            axis = m.axis if isinstance(m.axis, (tuple, list)) else (m.axis,)
            n_in = len(axis)
            if tuple(m.batch_dims):
              why = "DenseGeneral with batch_dims is not supported"
          found[path] = LayerInfo(path, kind, type(m).__name__, n_in, not why, why)
        elif kind == "conv":
          found[path] = LayerInfo(path, kind, type(m).__name__, 1)
        elif isinstance(m, UNSUPPORTED_MODULES):
          found[path] = LayerInfo(path, "other", type(m).__name__, 1, False,
                                  f"{type(m).__name__} does not call the dot_general/"
                                  f"conv_general_dilated seam")
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, **call_kwargs),
                   sample_input)
  return tuple(found.values())


# ---------------------------------------------------------------------------------------

def make_policy(name_or_rules: Union[str, Sequence, Policy], *, datapath: str = "fake",
                backend: str = "jax", hw_plugin: str = "") -> Policy:
  """Builds a policy from a preset name, a compact string or the Python form.

  backend "jax" runs everything in JAX; "hw" runs every quantized GEMM (and its operand
  quantizers) on a hardware plugin's custom calls (`coltrain.numerics.hw`; needs
  datapath "exact"): `hw_plugin` is the plugin library ("" = $COLTRAIN_HW_PLUGIN or the
  built-in CPU datapath model), and every format/rounding is checked against its
  capabilities here.

  Everything (formats, roundings, patterns, fractions, exact-datapath configurations) is
  validated here; errors raise ValueError with a message saying what and where.
  """
  if datapath not in ("fake", "exact"):
    raise PolicyError(f"unknown datapath {datapath!r}; expected 'fake' or 'exact'")
  if isinstance(name_or_rules, Policy):  # rebuild, e.g. for another datapath
    if name_or_rules.name in PRESETS:
      name_or_rules = name_or_rules.name
    else:
      name_or_rules = name_or_rules.source
  if isinstance(name_or_rules, str):
    text = name_or_rules.strip()
    if text in PRESETS:
      name, spec = text, parse_compact(PRESETS[text])
    elif "=" not in text:
      raise PolicyError(f"unknown policy preset {text!r}; presets: {', '.join(PRESETS)} "
                        f"(or rules, e.g. '@first,@last=bfp6;*=bfp4|0.9:*=bfp6')")
    else:
      name, spec = text, parse_compact(text)
  else:
    name, spec = "custom", name_or_rules
  try:
    phases = _build_phases(spec, datapath, backend, hw_plugin)
  except PolicyError:
    raise
  except ValueError as e:  # e.g. a DotSpec backend error
    raise PolicyError(str(e)) from None
  return Policy(name, phases, datapath, backend, hw_plugin, source=spec)
