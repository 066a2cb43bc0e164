#!/usr/bin/env python
"""Generate ``docs/config_reference.md`` from the trainer configs in ``verl/trainer/config/*.yaml``.

    python scripts/gen_config_reference.py            # (re)write docs/config_reference.md
    python scripts/gen_config_reference.py --check    # exit 1 when the committed file differs from a fresh one

The yaml files are the single source of truth: every key, its default as written (interpolations included) and its
meaning, taken from the comments in the yaml itself:

* the comment lines directly above a key (no blank line in between) and the comment at the end of its line;
* a key without a comment whose value is an interpolation (``${oc.select:other.key,default}``) "follows" that key;
* a key without a comment in a file composed on top of another one (Hydra ``defaults:``) takes the meaning of the
  same key in the base file;
* a key of the reference, critic or reward model without a comment takes the meaning of the actor's key at the same
  relative path (``critic.megatron.seed`` -> ``actor_rollout_ref.actor.megatron.seed``).

Comments are parsed from the text (PyYAML drops them), so this is a small line-based reader of the subset of YAML
these files use: nested mappings by indentation, scalars, flow lists / dicts, and the block list of ``defaults:``.
A test (tests/docs/test_docs.py) checks that the committed reference equals a fresh generation and that every key
has a meaning.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "verl", "trainer", "config")
OUTPUT = os.path.join(REPO, "docs", "config_reference.md")

# the order of the files in the reference (any other yaml file in CONFIG_DIR follows, sorted)
FILE_ORDER = ("ppo_trainer.yaml", "ppo_megatron_trainer.yaml", "generation.yaml", "evaluation.yaml", "sft_trainer.yaml")
# the command each file configures (for the headings)
ENTRY_POINTS = {
    "ppo_trainer.yaml": "python -m verl.trainer.main_ppo",
    "ppo_megatron_trainer.yaml": "python -m verl.trainer.main_ppo --config-name ppo_megatron_trainer",
    "generation.yaml": "python -m verl.trainer.main_generation",
    "evaluation.yaml": "python -m verl.trainer.main_eval",
    "sft_trainer.yaml": "torchrun -m verl.trainer.fsdp_sft_trainer",
}
# role prefixes whose uncommented keys mirror the actor's key at the same relative path
MIRRORED_ROLES = ("actor_rollout_ref.ref.", "critic.", "reward_model.")
ACTOR_PREFIX = "actor_rollout_ref.actor."

_KEY_RE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w\-]*):(?P<rest>.*)$")
_ITEM_RE = re.compile(r"^(?P<indent> *)- (?P<value>.*)$")
_INTERP_RE = re.compile(r"^\$\{(?:oc\.select:)?(?P<target>[\w.\-]+)(?:,(?P<default>.*))?\}$")


@dataclasses.dataclass
class Entry:
    """One key of a yaml file."""
    path: str  # dotted path
    value: str  # the default as written ("" for a mapping)
    comment: str  # from the yaml comments ("" when none)
    is_section: bool  # a mapping with children
    meaning: str = ""  # comment, or derived (see module docstring)


@dataclasses.dataclass
class ConfigFile:
    """A parsed yaml file: its header comment, its Hydra defaults and its keys in file order."""
    name: str
    header: str
    defaults: list[str]
    entries: list[Entry]

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}


def split_comment(text: str) -> tuple[str, str]:
    """``(value, comment)`` of the part of a line after ``key:``; a ``#`` starts a comment only outside quotes and
    after whitespace (or at the start)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def parse_yaml_with_comments(path: str) -> ConfigFile:
    """Read ``path`` into a :class:`ConfigFile` (see the module docstring for the supported subset)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):  # the leading comment block describes the file
        header.append(lines[i].lstrip()[1:][1:] if lines[i].lstrip().startswith("# ") else lines[i].lstrip()[1:])
        i += 1
    entries: list[Entry] = []
    defaults: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []  # comment lines waiting for the next key
    list_owner: Optional[Entry] = None
    for lineno, line in enumerate(lines[i:], start=i + 1):
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped[1:].strip())
            continue
        item = _ITEM_RE.match(line)
        if item:
            value, _ = split_comment(item.group("value"))
            if list_owner is None:
                raise ValueError(f"{path}:{lineno}: a list item outside a key")
            if list_owner.path == "defaults":
                defaults.append(value)
            list_owner.value = (list_owner.value[:-1] + ", " if list_owner.value else "[") + value + "]"
            list_owner.is_section = False
            pending = []
            continue
        m = _KEY_RE.match(line)
        if not m:
            raise ValueError(f"{path}:{lineno}: cannot parse {line!r} (expected 'key: value', '- item' or a comment)")
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [m.group("key")])
        value, inline = split_comment(m.group("rest"))
        comment = " ".join(pending + ([inline] if inline else [])).strip()
        pending = []
        entry = Entry(path=dotted, value=value, comment=comment, is_section=(value == ""))
        entries.append(entry)
        if value == "":
            stack.append((indent, m.group("key")))
            list_owner = entry
        else:
            list_owner = None
    # a "section" without children (only list items, or nothing) is a leaf
    parents = {e.path.rsplit(".", 1)[0] for e in entries if "." in e.path}
    for e in entries:
        if e.is_section and e.path not in parents:
            e.is_section = False
            e.value = e.value or "null"
    entries = [e for e in entries if e.path != "defaults"]
    return ConfigFile(name=os.path.basename(path),
                      header="\n".join(header).strip("\n"),
                      defaults=defaults,
                      entries=entries)


def _interpolation_meaning(path: str, value: str) -> str:
    m = _INTERP_RE.match(value)
    if not m:
        return ""
    target = m.group("target")
    if target.startswith("."):  # relative to the key's own mapping
        target = path.rsplit(".", 1)[0] + target
    default = m.group("default")
    fallback = f" (`{default}` when that key is absent)" if default is not None else ""
    return f"Follows `{target}`{fallback}."


def resolve_meanings(files: dict[str, ConfigFile]) -> None:
    """Fill ``Entry.meaning`` of every entry of every file (see the module docstring for the rules)."""
    for cfg in files.values():
        own = cfg.by_path()
        bases = [files[f"{d}.yaml"].by_path() for d in cfg.defaults if f"{d}.yaml" in files]
        for e in cfg.entries:
            meaning = e.comment or _interpolation_meaning(e.path, e.value)
            if not meaning:
                for base in bases:
                    if e.path in base and base[e.path].comment:
                        meaning = f"As in {base_name(files, base)}: {base[e.path].comment}"
                        break
            if not meaning and not e.is_section:
                for role in MIRRORED_ROLES:
                    if e.path.startswith(role):
                        twin = ACTOR_PREFIX + e.path[len(role):]
                        for table in [own] + bases:
                            if twin in table and table[twin].comment:
                                meaning = f"As `{twin}`, for this role: {table[twin].comment}"
                                break
                    if meaning:
                        break
            e.meaning = meaning


def base_name(files: dict[str, ConfigFile], table: dict[str, Entry]) -> str:
    for name, cfg in files.items():
        if cfg.by_path() == table:
            return f"`{name}`"
    return "the base config"


def load_all(config_dir: str = CONFIG_DIR) -> dict[str, ConfigFile]:
    names = [n for n in FILE_ORDER if os.path.exists(os.path.join(config_dir, n))]
    names += sorted(n for n in os.listdir(config_dir) if n.endswith(".yaml") and n not in names)
    files = {n: parse_yaml_with_comments(os.path.join(config_dir, n)) for n in names}
    resolve_meanings(files)
    return files


def missing_meanings(files: dict[str, ConfigFile]) -> dict[str, list[str]]:
    """``{file: [keys without a meaning]}`` (leaf keys only; sections may go without)."""
    out: dict[str, list[str]] = {}
    for name, cfg in files.items():
        keys = [e.path for e in cfg.entries if not e.is_section and not e.meaning]
        if keys:
            out[name] = keys
    return out


def _cell(text: str) -> str:
    """A table cell: pipes escaped, and Markdown emphasis characters escaped outside `code` spans."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def anchor(name: str) -> str:
    """The heading id MkDocs (Python-Markdown toc) gives a ``## `name` `` heading."""
    return re.sub(r"[^\w\- ]", "", name).strip().lower().replace(" ", "-")


def render(files: dict[str, ConfigFile]) -> str:
    out = [
        "# Config reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from verl/trainer/config/*.yaml: do not edit by hand. -->",
        "",
        "Every key of the trainer configs in `verl/trainer/config/`, with its default as written in the yaml and its",
        "meaning (the yaml's own comments). Override any key on the command line as `key=value`; add a key that is not",
        "listed with `+key=value`. A default `${oc.select:other.key,d}` follows `other.key` (so overriding that key",
        "moves this one too). This page is generated: `python scripts/gen_config_reference.py` rewrites it, and the",
        "docs test fails when it is out of date.",
        "",
    ]
    for name, cfg in files.items():
        out.append(f"- [`{name}`](#{anchor(name)}): `{ENTRY_POINTS.get(name, name)}`")
    out.append("")
    for name, cfg in files.items():
        out += [f"## `{name}`", ""]
        out += [f"Used by `{ENTRY_POINTS.get(name, name)}`.", ""]
        if cfg.defaults:
            out += [f"Composed by Hydra from: {', '.join(f'`{d}`' for d in cfg.defaults)} (later entries win).", ""]
        if cfg.header:
            out += ["```text", cfg.header, "```", ""]
        top_sections: list[tuple[str, list[Entry]]] = []
        for e in cfg.entries:
            top = e.path.split(".", 1)[0]
            if not top_sections or top_sections[-1][0] != top:
                top_sections.append((top, []))
            top_sections[-1][1].append(e)
        for top, entries in top_sections:
            first = entries[0]
            out += [f"### `{name.rsplit('.', 1)[0]}`: `{top}`", ""]
            if first.is_section and first.meaning:
                out += [first.meaning, ""]
            rows = [e for e in entries if not e.is_section or (e is not first and e.meaning)]
            if not rows:
                continue
            out += ["| key | default | meaning |", "| --- | --- | --- |"]
            for e in rows:
                key = e.path + (".*" if e.is_section else "")
                out.append(f"| {_code(key)} | {_cell(_code(e.value))} | {_cell(e.meaning)} |")
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed reference is out of date")
    parser.add_argument("--output", default=OUTPUT, help="where to write (default docs/config_reference.md)")
    args = parser.parse_args(argv)
    files = load_all()
    text = render(files)
    for name, keys in missing_meanings(files).items():
        print(f"warning: {name}: {len(keys)} key(s) without a comment: {', '.join(keys)}", file=sys.stderr)
    if args.check:
        current = open(args.output, encoding="utf-8").read() if os.path.exists(args.output) else ""
        if current != text:
            print(
                f"{os.path.relpath(args.output, REPO)} is out of date with verl/trainer/config/*.yaml. Fix: run "
                "`python scripts/gen_config_reference.py` and commit the result",
                file=sys.stderr)
            return 1
        print(f"{os.path.relpath(args.output, REPO)} is up to date")
        return 0
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(args.output, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
