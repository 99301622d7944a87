"""Checkpoint key -> model parameter name: transformers' renaming, done once per key shape, with strict checks of loose and per-expert matches."""

from __future__ import annotations

import functools
import re

from .checkpoint import Checkpoint
from .errors import CheckpointError


# False: every key goes through transformers' rename_source_key and `_loose_match` (the reference path the tests
# compare `_Renamer`'s reuse against).
_REUSE_RENAMES = True

# A token of the regexes transformers compiles from plain names: a word, '\.', '.*', '.', '^', '$', '(?!\w)'
_RX_TOKEN = r"(?:[A-Za-z_]\w*|\\\.|\.\*|\.|\^|\$|\(\?!\\w\))"
_RX_BRANCH = re.compile(rf"\(\?P<g(\d+)>({_RX_TOKEN}+)\)", re.ASCII)
_RX_PLAIN = re.compile(rf"{_RX_BRANCH.pattern}(?:\|{_RX_BRANCH.pattern})*", re.ASCII)
_KEY_PLAIN = re.compile(r"(?:[A-Za-z_]\w*|\d+)(?:\.(?:[A-Za-z_]\w*|\d+))*", re.ASCII)  # dotted words and numbers
_NUMBER = re.compile(r"(?<![^.])(\d+)(?![^.])", re.ASCII)  # a whole dot-separated number (split: keeps it)


def _number_blind(t) -> bool:
    """Whether transform `t` renames two keys that differ only in their numbers (whole dot-separated components)
    the same way, carrying the numbers over unchanged. See `_Renamer` for why these conditions are enough."""
    from transformers.core_model_loading import WeightTransform

    cls = type(t)
    regex, targets, sources = (getattr(t, a, None) for a in ("compiled_sources", "target_patterns", "source_patterns"))
    if (getattr(cls, "rename_source_key", None) is not WeightTransform.rename_source_key
            or getattr(cls, "_scoped_match", None) is not WeightTransform._scoped_match
            or getattr(t, "scope_prefix", None) is not None or not isinstance(regex, re.Pattern) or regex.flags & ~re.UNICODE
            or not targets or not sources or not re.fullmatch(r"(?:[A-Za-z_]\w*|\.)+", targets[0], re.ASCII)
            or not _RX_PLAIN.fullmatch(regex.pattern)):
        return False
    replacement = targets[0]
    for branch in _RX_BRANCH.finditer(regex.pattern):
        tokens = re.findall(_RX_TOKEN, branch.group(2), re.ASCII)
        consuming = [i for i, tok in enumerate(tokens) if tok not in ("^", "$", r"(?!\w)")]
        if not any(tok[0].isalpha() or tok[0] == "_" for tok in tokens):
            return False
        for i in consuming:
            prev, nxt = tokens[i - 1] if i else "", tokens[i + 1] if i + 1 < len(tokens) else ""
            if tokens[i] == ".*" and nxt != r"\.":
                return False  # '.*' must stop at a dot, never inside a number
            if tokens[i] == "." and not (prev[:1].isalpha() or prev[:1] == "_" or nxt[:1].isalpha() or nxt[:1] == "_"):
                return False  # '.' next to a word cannot match a digit of a number
        first, last = tokens[consuming[0]], tokens[consuming[-1]]
        if first in (".", r"\.") and not replacement.startswith("."):
            return False  # the match may start with the dot after a number: keep a dot there
        if last in (".", r"\.") and not replacement.endswith("."):
            return False  # ... or end with the dot before one
        if last == "." and not re.fullmatch(r"[\w.*]+", sources[int(branch.group(1))]):
            return False  # a final '.' may match a letter, leaving the digits after it a name of their own: only
            # `_loose_match` (None for every reused shape) proves it matched a dot, and only for such plain names
        if (last not in (".", r"\.", ".*") and not {r"(?!\w)", "$"} & set(tokens[consuming[-1]:])
                and not (replacement[-1].isalnum() or replacement[-1] == "_")):
            return False  # a final word may end inside a longer word only if the rest of it stays glued to a word
            # (transformers < 5.24 compiles 'LayerNorm.gamma' with no '(?!\w)' after it)
    return True


class _Renamer:
    r"""key -> (model name, converter source pattern or None, loose pattern or None), exactly what transformers'
    rename_source_key(key, renamings, converters, base_model_prefix, meta) and `_loose_match` give, computed once
    per key *shape* (the key with its numbers taken out: 'model.layers.#.mlp.experts.#.up_proj.weight') and reused
    for the other keys of that shape with their own numbers (Qwen1.5-MoE-A2.7B: 4659 keys, 17 shapes).

    Why reuse is exact. It is only done when every transform is `_number_blind` (transformers' plain regex renaming,
    regexes made of words, '\.', '.' next to a word, '.*' followed by '\.', '^', '$' and '(?!\w)', replaced by a dotted
    name), the key is dotted words and numbers, its numbers pairwise distinct, and the first key of the shape was
    not a loose match (build_plan stops there anyway). Then no atom of such a regex can match a digit of a number
    except '.*', which stops only before a dot: a word starts with a letter and the character before a number's
    digit is a dot or a digit; '.' next to a word would need that word to match next to the digit. So each search
    matches the same branch at the same place of the shape in both keys, its text differing only in whole numbers;
    str.replace's first occurrence of that text is the same place (another occurrence would repeat a number); the
    replacement keeps the dots around numbers (the boundary rules in `_number_blind`; a match ending inside a word
    is replaced by text ending in a word character, so the rest of that word stays a word), so the renamed key is again
    dotted words, empty names and the key's numbers, and the next transform sees the same shape. Hence the renamed
    key is the representative's with the numbers substituted, and the converter pattern and the loose-match result
    are the representative's. That substitution is also checked on a second, synthetic key with other (longer)
    numbers before a shape is reused. The base-model prefix step depends on `meta` (is the renamed key a
    parameter?), so it is not reused: transformers runs it for every key, on the renamed key.
    """

    def __init__(self, renamings: list, converters: list, prefix: str | None, meta: dict):
        from transformers.core_model_loading import rename_source_key

        self._rename_source_key = rename_source_key
        self.renamings, self.converters, self.prefix, self.meta = renamings, converters, prefix, meta
        self.reuse = _REUSE_RENAMES and all(_number_blind(t) for t in list(renamings) + list(converters))
        # key shape -> (renamed key without the base-model prefix step, as a str.format template of the key's
        # numbers, converter source pattern), or None where keys of that shape are renamed one by one
        self.shapes: dict[tuple[str, ...], tuple[str, str | None] | None] = {}
        self.prefixed: dict[str, str] = {}

    def exact(self, key: str) -> tuple[str, str | None, str | None]:
        target, pattern = self._rename_source_key(key, self.renamings, self.converters, self.prefix, self.meta)
        return target, pattern, _loose_match(key, self.renamings, self.converters)

    def __call__(self, key: str) -> tuple[str, str | None, str | None]:
        if not self.reuse:
            return self.exact(key)
        pieces = _NUMBER.split(key)  # [text, number, text, number, ..., text]
        numbers = pieces[1::2]
        if len(set(numbers)) < len(numbers):
            return self.exact(key)
        shape = tuple(pieces[0::2])
        if shape not in self.shapes:
            return self._learn(key, shape, numbers)
        known = self.shapes[shape]
        if known is None:
            return self.exact(key)
        return self._prefixed(known[0].format(*numbers)), known[1], None

    def _prefixed(self, renamed_key: str) -> str:
        """transformers' base-model prefix step alone (no transforms) on an already renamed key; the experts of
        one layer share their renamed key, so it is remembered."""
        target = self.prefixed.get(renamed_key)
        if target is None:
            target = self.prefixed[renamed_key] = self._rename_source_key(renamed_key, [], [], self.prefix, self.meta)[0]
        return target

    def _learn(self, key: str, shape: tuple[str, ...], numbers: list[str]) -> tuple[str, str | None, str | None]:
        """The exact result for `key`, the first of its shape; reuse it for the shape if it passes the checks."""
        result = self.exact(key)
        self.shapes[shape] = None
        # (whether a key is dotted words and numbers depends only on its shape: its numbers are whole components)
        if not numbers or not _KEY_PLAIN.fullmatch(key) or result[2] is not None:
            return result
        renamed_key, pattern = self._rename_source_key(key, self.renamings, self.converters)
        renamed = _NUMBER.split(renamed_key)
        if (pattern != result[1] or any(n not in numbers for n in renamed[1::2])
                or self._prefixed(renamed_key) != result[0]):
            return result
        template = "".join("{%d}" % numbers.index(p) if i % 2 else p.replace("{", "{{").replace("}", "}}") for i, p in enumerate(renamed))
        # the same shape with other numbers (longer, distinct) must rename to the template filled with them
        other = [str(10 ** (1 + max(map(len, numbers))) + i) for i in range(len(numbers))]
        synthetic = "".join(other[i // 2] if i % 2 else p for i, p in enumerate(_NUMBER.split(key)))
        if (self._rename_source_key(synthetic, self.renamings, self.converters) == (template.format(*other), pattern)
                and _loose_match(synthetic, self.renamings, self.converters) is None):
            self.shapes[shape] = (template, pattern)
        return result


def _loose_match(key: str, renamings, converters) -> str | None:
    """The rename/convert pattern that matched `key` only because transformers matches its patterns as
    regexes ('.block_sparse_moe.' also matches ':block_sparse_moe.'), or None: a misspelled key must not be
    renamed into a real parameter name."""
    k = key
    for i, t in enumerate(list(renamings) + list(converters)):
        scoped = getattr(t, "_scoped_match", None)
        if scoped is None:
            return None
        matched = scoped(k)
        if matched is None:
            continue
        m = matched[2]
        group = next((g for g, v in m.groupdict().items() if v is not None), None)
        if group is None or not group[1:].isdigit():
            return None
        pattern = t.source_patterns[int(group[1:])]
        strict = _strict_regex(pattern)
        if strict is not None and not strict.fullmatch(m.group(group)):
            return pattern
        if i >= len(renamings):
            return None  # at most one converter applies
        k = t.rename_source_key(k)[0]
    return None


@functools.lru_cache(maxsize=256)
def _strict_regex(pattern: str) -> re.Pattern | None:
    """'mlp.experts.*.w1.weight' -> the regex of that name read literally ('*': any text); None if not a plain name."""
    if not re.fullmatch(r"[\w.*]+", pattern):
        return None
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _expert_regex(pattern: str) -> re.Pattern | None:
    """'mlp.experts.*.up_proj.weight' -> strict regex (group 1: the expert index); None if not a plain wildcard name."""
    if "*" not in pattern or not re.fullmatch(r"[\w.*]+", pattern):
        return None
    body = r"(\d+)".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(("" if pattern.startswith(".") else r"(?<![^.])") + body + "$", re.ASCII)


def _expert_members(conv, target: str, members: list[tuple[str, str]], ckpt: Checkpoint, renamings, meta) -> list[tuple[str, str]]:
    """Per-expert sources of one fused parameter, checked and put in (source pattern, expert index) order.

    The converters stack whatever tensors they are given in list order and match keys loosely
    ('.experts.*.w1.weight' is a regex), so a renumbered, duplicated, misspelled or missing expert key
    would otherwise shift experts into the wrong slots silently. Every source pattern must have exactly
    experts 0..N-1.
    """
    regexes = {p: _expert_regex(p) for p in conv.source_patterns}
    if any(rx is None for rx in regexes.values()):
        return members
    try:
        from transformers.core_model_loading import apply_renamings
    except ImportError:
        def apply_renamings(key, _renamings):
            return key

    found: dict[str, dict[int, str]] = {p: {} for p in conv.source_patterns}
    experts = meta[target].shape[0] if target in meta and meta[target].dim() == 3 else None  # stacked [E, rows, cols]
    prefixes: dict[str, str] = {}
    for pattern, key in members:
        rx = regexes.get(pattern)
        m = rx.search(key) if rx else None
        if m is None and rx is not None:
            renamed = apply_renamings(key, renamings)
            m = rx.search(renamed)
            name = renamed
        else:
            name = key
        if m is None:
            raise CheckpointError(f"{ckpt.tensors[key].file}: unexpected tensor '{key}' (not a per-expert name matching '{pattern}')")
        idx = int(m.group(1))
        if experts is not None and idx >= experts:
            raise CheckpointError(f"{ckpt.tensors[key].file}: unexpected tensor '{key}' (expert {idx}, but the model's '{target}' has {experts} experts)")
        if idx in found[pattern]:
            raise CheckpointError(f"{ckpt.tensors[key].file}: tensors '{found[pattern][idx]}' and '{key}' are both expert {idx} of '{target}'")
        found[pattern][idx] = key
        if pattern not in prefixes:
            prefixes[pattern] = name[: m.start()]
    n = 1 + max((max(d) for d in found.values() if d), default=-1)
    any_prefix = next(iter(prefixes.values()), "")
    for pattern, have in found.items():
        for i in range(n):
            if i not in have:
                missing = prefixes.get(pattern, any_prefix) + pattern.replace("*", str(i))
                raise CheckpointError(f"{ckpt.path}: checkpoint has no tensor '{missing}' (expert {i} of {n} for the model's '{target}')")
    return [(p, found[p][i]) for p in conv.source_patterns for i in range(n)]
