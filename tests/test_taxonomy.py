import numpy as np
import pytest

from model.errors import TaxonomyError
from model.taxonomy import END_NAME, IGNORE, Node, Taxonomy


@pytest.fixture
def ragged() -> Taxonomy:
    # Animal/Mammal/{Cat,Dog(alias dog)}, Animal/Bird (leaf at depth 1), Plant (leaf at depth 0)
    return Taxonomy(
        [
            Node("Animal", children=[Node("Mammal", children=[Node("Cat"), Node("Dog", alias="dog")]), Node("Bird")]),
            Node("Plant"),
        ]
    )


def test_levels_and_end_classes(ragged: Taxonomy) -> None:
    assert ragged.depth == 3
    assert [len(level) for level in ragged.levels] == [2, 2, 2]
    assert ragged.has_end == [False, True, True]
    assert ragged.num_classes(0) == 2 and ragged.num_classes(1) == 3 and ragged.num_classes(2) == 3
    assert ragged.class_names(1) == ["Animal/Mammal", "Animal/Bird", END_NAME]


def test_encode_full_prefix_and_ragged(ragged: Taxonomy) -> None:
    assert ragged.encode(["Animal", "Mammal", "Cat"]).tolist() == [0, 0, 0]
    # a leaf above the last level gets END below it
    assert ragged.encode(["Plant"]).tolist() == [1, 2, 2]
    assert ragged.encode(["Animal", "Bird"]).tolist() == [0, 1, 2]
    # a prefix path says nothing about the levels below it
    assert ragged.encode(["Animal", "Mammal"]).tolist() == [0, 0, IGNORE]
    assert ragged.encode_many([]).shape == (0, 3)


def test_alias_is_the_path_name_and_value_resolves(ragged: Taxonomy) -> None:
    assert ragged.resolve(["Animal", "Mammal", "dog"]) == ("Animal", "Mammal", "dog")
    assert ragged.resolve(["Animal", "Mammal", "Dog"]) == ("Animal", "Mammal", "dog")


def test_unknown_path_names_the_element_and_the_options(ragged: Taxonomy) -> None:
    with pytest.raises(TaxonomyError) as err:
        ragged.encode(["Animal", "Fish"])
    msg = str(err.value)
    assert "'Fish'" in msg and "Animal" in msg and "Mammal" in msg and "Bird" in msg
    with pytest.raises(TaxonomyError, match="empty taxonomy path"):
        ragged.encode([])


def test_names_repeat_under_different_parents() -> None:
    tax = Taxonomy.from_nested({"A": ["Other", "x"], "B": ["Other", "y"]})
    assert tax.encode(["A", "Other"]).tolist() == [0, 0]
    assert tax.encode(["B", "Other"]).tolist() == [1, 2]


def test_validation_errors() -> None:
    with pytest.raises(TaxonomyError, match="appears twice"):
        Taxonomy.from_nested({"A": ["x", "x"], "B": None})
    with pytest.raises(TaxonomyError, match="single class"):
        Taxonomy.from_nested(["only"])
    with pytest.raises(TaxonomyError, match="empty"):
        Taxonomy.from_nested({})
    with pytest.raises(TaxonomyError, match="empty value"):
        Taxonomy([Node(" "), Node("b")])


def test_candidate_paths(ragged: Taxonomy) -> None:
    paths, index = ragged.candidate_paths(leafs_only=True)
    assert paths == [("Animal", "Mammal", "Cat"), ("Animal", "Mammal", "dog"), ("Animal", "Bird"), ("Plant",)]
    assert index.shape == (4, 3)
    all_paths, all_index = ragged.candidate_paths(leafs_only=False)
    assert len(all_paths) == len(ragged.nodes()) == 6
    assert all_index[all_paths.index(("Animal",))].tolist() == [0, IGNORE, IGNORE]


def test_json_round_trip_and_hash(ragged: Taxonomy) -> None:
    again = Taxonomy.from_json(ragged.to_json())
    assert again == ragged and again.hash() == ragged.hash()
    other = Taxonomy.from_json([*ragged.to_json(), {"value": "Fungus"}])
    assert other.hash() != ragged.hash()


def test_from_paths_builds_minimal_tree() -> None:
    tax = Taxonomy.from_paths([("wild", "Bear"), ("wild", "Zebra"), ("farm", "Cow")])
    assert tax.children_names(()) == ["wild", "farm"]
    assert tax.children_names(("wild",)) == ["Bear", "Zebra"]
    assert np.array_equal(tax.encode(("farm", "Cow")), [1, 2])
