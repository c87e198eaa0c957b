"""Parse a Label Studio label config (XML) into what the backend serves: one taxonomy over one image.

Served configs have one ``<Image>`` and one classification control pointing at it (``toName``):

* ``<Taxonomy>`` with nested ``<Choice>`` elements of any depth (ragged trees, ``alias``, ``leafsOnly``,
  ``maxUsages``), predicted as ``{"type": "taxonomy", "value": {"taxonomy": [[...path...]]}}``;
* flat ``<Choices>`` (at least two ``<Choice>``), served as a one-level taxonomy and predicted as
  ``{"type": "choices", "value": {"choices": [name]}}``.

When a config holds several controls, a single ``<Taxonomy>`` wins over ``<Choices>`` (those are usually
side questions such as image quality); two candidates of the same kind are an error naming both.
The XML is parsed here because label-studio-sdk's ``LabelInterface`` flattens the hierarchy.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from model.errors import ConfigError, TaxonomyError
from model.taxonomy import Node, Taxonomy

__all__ = ["ConfigKind", "LabelConfig", "config_hash", "parse_label_config"]


class ConfigKind(enum.Enum):
    """Which control tag the served config uses."""

    TAXONOMY = "taxonomy"
    CHOICES = "choices"


@dataclass(frozen=True)
class LabelConfig:
    """The served part of a label config.

    Attributes:
        kind: TAXONOMY or CHOICES.
        from_name: the control's ``name`` (``from_name`` of result items).
        to_name: the ``<Image>``'s ``name`` (``to_name`` of result items).
        image_key: the task data key holding the image (``value="$image"`` gives ``"image"``).
        taxonomy: the label tree (a flat ``<Choices>`` gives a one-level tree).
        leafs_only: whether only leaves may be chosen (Taxonomy ``leafsOnly``; always True for Choices).
        max_usages: how many paths one annotation may hold, None when unlimited.
        result_type: the result item ``type``: ``"taxonomy"`` or ``"choices"``.
        config_hash: sha256 of the XML text, the cache key.
    """

    kind: ConfigKind
    from_name: str
    to_name: str
    image_key: str
    taxonomy: Taxonomy
    leafs_only: bool
    max_usages: int | None
    result_type: str
    config_hash: str


def config_hash(xml: str) -> str:
    """sha256 of the label config text."""
    return hashlib.sha256(xml.encode("utf-8")).hexdigest()


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a label config; the result is cached per config text (Label Studio sends it with every call).

    Args:
        xml: the project's label config as Label Studio sends it (``schema`` in /setup, ``label_config``
            in /predict).

    Raises:
        ConfigError: the config cannot be served; the message names the tag and what to change.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError(
            "The label config is empty: Label Studio must send the project's labeling config "
            "(an <Image> and a <Taxonomy> or <Choices> pointing at it)."
        )
    return _parse_cached(xml)


MAX_NESTING = 64
"""Deepest element nesting of a label config accepted (a taxonomy of 64 levels is far beyond any real one)."""


@functools.lru_cache(maxsize=16)
def _parse_cached(xml: str) -> LabelConfig:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"The label config is not valid XML ({exc}); fix it in the project's Labeling Interface.") from None
    _check_nesting(root)
    images = {el.get("name"): el for el in root.iter() if _tag(el) == "image"}
    if not images:
        raise ConfigError(
            "The label config has no <Image> tag: taxomoco labels images. Add e.g. "
            '<Image name="image" value="$image"/> and point the <Taxonomy> at it with toName="image".'
        )
    controls = [el for el in root.iter() if _tag(el) in ("taxonomy", "choices")]
    if not controls:
        raise ConfigError(
            "The label config has no <Taxonomy> or <Choices> tag: add one with toName pointing at your "
            f"<Image> (names: {sorted(n for n in images if n)})."
        )
    for el in controls:
        for target in _to_names(el):
            if not any(_tag(t) for t in root.iter() if t.get("name") == target):
                raise ConfigError(
                    f'<{el.tag} name="{el.get("name")}"> has toName="{el.get("toName")}" but no tag is named '
                    f"{target!r}; set toName to the <Image>'s name ({sorted(n for n in images if n)})."
                )
    over_image = [el for el in controls if any(t in images for t in _to_names(el))]
    if not over_image:
        names = ", ".join(f'<{el.tag} name="{el.get("name")}" toName="{el.get("toName")}">' for el in controls)
        raise ConfigError(
            f"No <Taxonomy> or <Choices> points at an <Image>: {names}. Set toName to the <Image>'s name "
            f"({sorted(n for n in images if n)})."
        )
    control = _pick(over_image)
    image_name = next(t for t in _to_names(control) if t in images)
    image = images[image_name]
    return _build(control, image, config_hash(xml))


def _check_nesting(root: ET.Element) -> None:
    """Refuse configs nested deeper than :data:`MAX_NESTING` (checked without recursion)."""
    stack = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ConfigError(f"The label config nests elements more than {MAX_NESTING} deep; a taxonomy that deep "
                              "cannot be served (flatten it).")
        stack.extend((child, depth + 1) for child in el)


def _pick(candidates: list[ET.Element]) -> ET.Element:
    taxonomies = [el for el in candidates if _tag(el) == "taxonomy"]
    pool = taxonomies or candidates
    if len(pool) > 1:
        names = ", ".join(f'<{el.tag} name="{el.get("name")}">' for el in pool)
        raise ConfigError(
            f"The label config has several classification tags over the image ({names}); taxomoco serves one. "
            "Keep a single <Taxonomy> (other questions may stay as <Choices>), or merge them into one tag."
        )
    return pool[0]


def _build(control: ET.Element, image: ET.Element, digest: str) -> LabelConfig:
    name = control.get("name")
    where = f'<{control.tag} name="{name}">'
    if not name:
        raise ConfigError(f"<{control.tag} toName=\"{control.get('toName')}\"> has no name attribute; give it one.")
    to_name = image.get("name") or ""
    value = (image.get("value") or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(
            f'<Image name="{to_name}"> has value="{value}"; it must name a task data field, e.g. value="$image".'
        )
    if control.get("value", "").startswith("$") or control.get("apiUrl"):
        raise ConfigError(
            f"{where} loads its choices dynamically (value/apiUrl); taxomoco needs the labels in the config. "
            "List the <Choice> elements inside the tag."
        )
    kind = ConfigKind.TAXONOMY if _tag(control) == "taxonomy" else ConfigKind.CHOICES
    roots = _nodes(control, where, nested=kind is ConfigKind.TAXONOMY)
    if kind is ConfigKind.CHOICES and len(roots) < 2:
        raise ConfigError(
            f"{where} has {len(roots)} <Choice>; a classifier needs at least two. Add another <Choice>."
        )
    try:
        taxonomy = Taxonomy(roots)
    except TaxonomyError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if kind is ConfigKind.TAXONOMY:
        leafs_only = _bool_attr(control, "leafsOnly", default=False, where=where)
        max_usages = _int_attr(control, "maxUsages", where=where)
    else:
        leafs_only = True
        max_usages = None if (control.get("choice") or "single").lower() == "multiple" else 1
    return LabelConfig(
        kind=kind,
        from_name=name,
        to_name=to_name,
        image_key=value[1:],
        taxonomy=taxonomy,
        leafs_only=leafs_only,
        max_usages=max_usages,
        result_type=kind.value,
        config_hash=digest,
    )


def _nodes(parent: ET.Element, where: str, nested: bool) -> list[Node]:
    out: list[Node] = []
    for el in parent:
        tag = _tag(el)
        if tag != "choice":
            if tag in ("view", "header", "style"):  # layout wrappers around choices are allowed
                out.extend(_nodes(el, where, nested))
            continue
        value = el.get("value")
        if value is None or not value.strip():
            raise ConfigError(f"{where} has a <Choice> without a value; give every <Choice> a value.")
        children = _nodes(el, where, nested) if nested else []
        if not nested and any(_tag(c) == "choice" for c in el):
            raise ConfigError(f"{where} nests <Choice> inside {value!r}; use <Taxonomy> for a hierarchy.")
        out.append(Node(value=value, alias=el.get("alias") or None, children=children))
    return out


def _to_names(el: ET.Element) -> list[str]:
    return [t.strip() for t in (el.get("toName") or "").split(",") if t.strip()]


def _tag(el: ET.Element) -> str:
    return el.tag.lower() if isinstance(el.tag, str) else ""


def _bool_attr(el: ET.Element, attr: str, default: bool, where: str) -> bool:
    raw = el.get(attr)
    if raw is None:
        return default
    if raw.strip().lower() in ("true", "1", "yes"):
        return True
    if raw.strip().lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f'{where} has {attr}="{raw}"; use {attr}="true" or {attr}="false".')


def _int_attr(el: ET.Element, attr: str, where: str) -> int | None:
    raw = el.get(attr)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f'{where} has {attr}="{raw}"; use a whole number such as {attr}="1".') from None
    if value < 1:
        raise ConfigError(f'{where} has {attr}="{raw}"; it must be at least 1 (or left out for no limit).')
    return value
