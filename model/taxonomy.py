"""A tree of labels of any depth, and the per-level label indices the heads are trained on.

Vocabulary:
    * A *node* is one label in the tree. Its *name* is what paths use: the Label Studio ``alias`` when
      one is set, else its ``value``. Names are unique among siblings and may repeat under different
      parents (``Animal/Other`` and ``Plant/Other``).
    * A *path* is a tuple of names from a root to a node, e.g. ``("Animal", "Mammal", "Cat")``. A path
      that ends at a leaf is *full*; one that ends at an inner node is a *prefix*.
    * *Level* ``k`` (0-based) holds every node at depth ``k``. The head of level ``k`` has one class per
      such node, plus one ``END`` class when some leaf ends above level ``k`` (a ragged tree), so that
      every full path has exactly one class at every level.

Encoding a path gives one index per level (``(L,)``): the node's index at its level, ``end_index(k)``
below a leaf, and :data:`IGNORE` below a prefix path (the annotator did not say).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.arrays import IntArray
from model.errors import TaxonomyError

__all__ = ["END_NAME", "IGNORE", "Node", "Path", "Taxonomy"]

IGNORE = -1
"""Level index meaning "no label at this level" (below a prefix path); heads skip it in the loss."""

END_NAME = "<end>"
"""Display name of the END class of a level (the path already ended at a leaf above it)."""

Path = tuple[str, ...]


@dataclass
class Node:
    """One label of the tree.

    Attributes:
        value: the Choice ``value`` (what Label Studio shows).
        alias: the Choice ``alias``, or None.
        children: child nodes in config order.
        path: names from the root to this node (filled in by :class:`Taxonomy`).
        index: index among all nodes of the same depth (filled in by :class:`Taxonomy`).
    """

    value: str
    alias: str | None = None
    children: list[Node] = field(default_factory=list)
    path: Path = ()
    index: int = -1

    @property
    def name(self) -> str:
        return self.alias if self.alias else self.value

    @property
    def depth(self) -> int:
        return len(self.path) - 1

    @property
    def is_leaf(self) -> bool:
        return not self.children


class Taxonomy:
    """An immutable label tree with per-level class indices.

    Args:
        roots: the top-level nodes, each with its children. Validated here: at least two top-level labels
            (or one with children), non-empty names, names unique among siblings.

    Raises:
        TaxonomyError: naming the offending path and the remedy.
    """

    def __init__(self, roots: Sequence[Node]) -> None:
        self._roots = list(roots)
        self._by_path: dict[Path, Node] = {}
        self._by_value_path: dict[Path, Node] = {}
        self.levels: list[list[Node]] = []
        self._candidates: dict[bool, tuple[list[Path], IntArray]] = {}
        self._assign(self._roots, (), ())
        if not self._roots:
            raise TaxonomyError("The taxonomy is empty: add at least two labels (Choice elements).")
        if len(self.leaves()) < 2:
            raise TaxonomyError(
                f"The taxonomy has a single class {self.leaves()[0].path}: a classifier needs at least two. "
                "Add another label (or, for the command line, another sub-folder of labelled images)."
            )
        self.depth = len(self.levels)
        # has_end[k]: level k needs an END class because some leaf ends above it.
        self.has_end = [any(n.is_leaf and n.depth < k for n in self.nodes()) for k in range(self.depth)]

    # ----- construction -------------------------------------------------------------------------------
    def _assign(self, nodes: Sequence[Node], parent: Path, parent_values: Path) -> None:
        seen: dict[str, Node] = {}
        for node in nodes:
            if not node.value or not node.value.strip():
                raise TaxonomyError(f"A label under {list(parent) or 'the root'} has an empty value; give it a name.")
            if node.name in seen:
                raise TaxonomyError(
                    f"The label {node.name!r} appears twice under {list(parent) or 'the root'}: names must be unique "
                    "among siblings. Rename one of them or merge them."
                )
            seen[node.name] = node
            node.path = (*parent, node.name)
            depth = len(parent)
            if len(self.levels) <= depth:
                self.levels.append([])
            node.index = len(self.levels[depth])
            self.levels[depth].append(node)
            self._by_path[node.path] = node
            self._by_value_path.setdefault((*parent_values, node.value), node)
            self._assign(node.children, node.path, (*parent_values, node.value))

    @classmethod
    def from_nested(cls, tree: Mapping[str, object] | Sequence[str]) -> Taxonomy:
        """Build from nested mappings: ``{"wild": {"Bear": None, "Zebra": {}}, "pet": ["Cat", "Dog"]}``."""
        def build(spec: Mapping[str, object] | Sequence[str] | None) -> list[Node]:
            if spec is None:
                return []
            if isinstance(spec, Mapping):
                return [Node(str(k), children=build(v)) for k, v in spec.items()]  # type: ignore[arg-type]
            if isinstance(spec, str):
                raise TaxonomyError(f"Expected a list or mapping of labels, got the string {spec!r}.")
            return [Node(str(k)) for k in spec]

        return cls(build(tree))

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[str]]) -> Taxonomy:
        """Build the smallest tree that contains every path (e.g. from a folder tree of images)."""
        roots: dict[str, dict[str, Any]] = {}
        for path in paths:
            level = roots
            for name in path:
                level = level.setdefault(str(name), {})
        return cls.from_nested(roots or {})

    # ----- queries ------------------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        return [n for level in self.levels for n in level]

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes() if n.is_leaf]

    def node(self, path: Sequence[str]) -> Node:
        """The node at ``path`` (names, or Choice values when aliases are set)."""
        key = tuple(path)
        node = self._by_path.get(key) or self._by_value_path.get(key)
        if node is None:
            raise TaxonomyError(self._unknown_path_message(key))
        return node

    def resolve(self, path: Sequence[str]) -> Path:
        """The canonical (alias-or-value) form of a path; raises TaxonomyError for an unknown path."""
        return self.node(path).path

    def num_classes(self, level: int) -> int:
        """Classes of the head of ``level``: its nodes, plus END where the tree is ragged."""
        return len(self.levels[level]) + int(self.has_end[level])

    def end_index(self, level: int) -> int:
        if not self.has_end[level]:
            raise TaxonomyError(f"Level {level} has no END class: every path reaches it.")
        return len(self.levels[level])

    def class_names(self, level: int) -> list[str]:
        """Display names of the classes of ``level``, in index order (END last, where present)."""
        names = ["/".join(n.path) for n in self.levels[level]]
        return names + [END_NAME] if self.has_end[level] else names

    def encode(self, path: Sequence[str]) -> IntArray:
        """Per-level indices of ``path``. Shape ``(L,)``, int64; IGNORE below a prefix, END below a leaf."""
        node = self.node(path)
        out = np.full(self.depth, IGNORE, dtype=np.int64)
        for k in range(len(node.path)):
            out[k] = self._by_path[node.path[: k + 1]].index
        if node.is_leaf:
            for k in range(len(node.path), self.depth):
                out[k] = self.end_index(k)
        return out

    def encode_many(self, paths: Sequence[Sequence[str]]) -> IntArray:
        """Shape ``(N, L)`` int64, one row per path (see :meth:`encode`)."""
        if not paths:
            return np.zeros((0, self.depth), dtype=np.int64)
        return np.stack([self.encode(p) for p in paths])

    def candidate_paths(self, leafs_only: bool = True) -> tuple[list[Path], IntArray]:
        """Every path a prediction may name, and its per-level class indices.

        Returns:
            paths: P paths (leaves only, or every node when ``leafs_only`` is False), in tree order.
            index: shape ``(P, L)`` int64; for an inner node the levels below it are IGNORE (its
                probability is the sum over the full paths under it).
        """
        if leafs_only not in self._candidates:  # the tree never changes: computed once per kind
            nodes = sorted(self.leaves() if leafs_only else self.nodes(), key=self._order)
            index = self.encode_many([n.path for n in nodes])
            index.setflags(write=False)
            self._candidates[leafs_only] = ([n.path for n in nodes], index)
        paths, index = self._candidates[leafs_only]
        return list(paths), index

    def _order(self, node: Node) -> tuple[int, ...]:
        return tuple(self._by_path[node.path[: k + 1]].index for k in range(len(node.path)))

    def children_names(self, path: Sequence[str]) -> list[str]:
        nodes = self.node(path).children if path else self._roots
        return [n.name for n in nodes]

    def hash(self) -> str:
        """Stable sha256 of the tree (values, aliases, order); changes whenever the classes change."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    # ----- serialisation ------------------------------------------------------------------------------
    def to_json(self) -> list[dict[str, Any]]:
        def dump(n: Node) -> dict[str, Any]:
            d: dict[str, Any] = {"value": n.value}
            if n.alias:
                d["alias"] = n.alias
            if n.children:
                d["children"] = [dump(c) for c in n.children]
            return d

        return [dump(n) for n in self._roots]

    @classmethod
    def from_json(cls, data: Sequence[Mapping[str, Any]]) -> Taxonomy:
        def load(d: Mapping[str, Any]) -> Node:
            return Node(str(d["value"]), d.get("alias"), [load(c) for c in d.get("children", [])])

        return cls([load(d) for d in data])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Taxonomy(levels={[len(lv) for lv in self.levels]}, leaves={len(self.leaves())})"

    def _unknown_path_message(self, path: Path) -> str:
        if not path:
            return "An empty taxonomy path was given; a path names at least a top-level label."
        known: Path = ()
        for name in path:
            options = self.children_names(known)
            if name not in options and (*known, name) not in self._by_value_path:
                where = "/".join(known) if known else "the top level"
                return (
                    f"Unknown taxonomy path {list(path)}: {name!r} is not a label under {where}; "
                    f"valid labels there are {options}. Fix the annotation or add the label to the label config."
                )
            known = self.node((*known, name)).path
        return f"Unknown taxonomy path {list(path)}."
