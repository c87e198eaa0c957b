"""Label Studio JSON: prediction items, annotation paths, project ids."""

from dataclasses import dataclass

import pytest

from ml_backend.labelstudio.annotations import annotation_paths, parse_annotation
from ml_backend.labelstudio.ids import project_id_of
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.results import prediction_result
from model.errors import DataError

TAX = """<View><Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="false">
    <Choice value="Animal"><Choice value="Mammal"><Choice value="Cat"/><Choice value="Dog" alias="dog"/></Choice>
      <Choice value="Bird"/></Choice>
    <Choice value="Plant"/>
  </Taxonomy></View>"""
CHO = """<View><Image name="img" value="$url"/>
  <Choices name="label" toName="img"><Choice value="Cat"/><Choice value="Dog"/></Choices></View>"""


@dataclass
class Pred:
    path: tuple
    score: float


def test_taxonomy_prediction_item():
    cfg = parse_label_config(TAX)
    out = prediction_result(cfg, Pred(("Animal", "Mammal", "dog"), 0.75), "v3")
    assert out == {
        "result": [
            {
                "from_name": "taxonomy",
                "to_name": "image",
                "type": "taxonomy",
                "value": {"taxonomy": [["Animal", "Mammal", "dog"]]},
                "score": 0.75,
            }
        ],
        "score": 0.75,
        "model_version": "v3",
    }


def test_choices_prediction_item_and_empty_item():
    cfg = parse_label_config(CHO)
    out = prediction_result(cfg, Pred(("Dog",), 0.5), "v1")
    assert out["result"][0]["type"] == "choices" and out["result"][0]["value"] == {"choices": ["Dog"]}
    assert out["result"][0]["to_name"] == "img" and out["result"][0]["from_name"] == "label"
    assert prediction_result(cfg, None, "v1") == {"result": [], "score": 0.0, "model_version": "v1"}


def item(paths, from_name="taxonomy"):
    return {"from_name": from_name, "to_name": "image", "type": "taxonomy", "value": {"taxonomy": paths}}


def test_prefix_paths_keep_the_deepest_and_values_resolve_to_aliases():
    cfg = parse_label_config(TAX)
    paths = annotation_paths([item([["Animal"], ["Animal", "Mammal"], ["Animal", "Mammal", "Dog"]])], cfg)
    assert paths == [("Animal", "Mammal", "dog")]


def test_multi_path_values_and_duplicates():
    cfg = parse_label_config(TAX)
    result = [item([["Plant"], ["Animal", "Bird"]]), item([["Plant"]]), item([["X"]], from_name="other")]
    assert annotation_paths(result, cfg) == [("Plant",), ("Animal", "Bird")]


def test_a_lone_prefix_is_kept():
    cfg = parse_label_config(TAX)
    assert annotation_paths([item([["Animal", "Mammal"]])], cfg) == [("Animal", "Mammal")]


def test_unknown_labels_are_reported_not_raised():
    cfg = parse_label_config(TAX)
    parsed = parse_annotation([item([["Animal", "Fish"], ["Plant"]])], cfg)
    assert parsed.paths == [("Plant",)]
    assert len(parsed.unknown) == 1 and parsed.unknown[0][0] == ("Animal", "Fish")
    assert "Fish" in parsed.unknown[0][1]
    assert annotation_paths(None, cfg) == [] and annotation_paths([{"bad": 1}, "x"], cfg) == []


def test_choices_results():
    cfg = parse_label_config(CHO)
    result = [{"from_name": "label", "to_name": "img", "type": "choices", "value": {"choices": ["Dog", "Eel"]}}]
    parsed = parse_annotation(result, cfg)
    assert parsed.paths == [("Dog",)] and [p for p, _ in parsed.unknown] == [("Eel",)]


@pytest.mark.parametrize("value", [7, "7", "7.1712345678", {"id": 7}, {"id": "7"}, 7.0])
def test_project_id_forms(value):
    assert project_id_of(value) == 7


@pytest.mark.parametrize("value", [None, "", "abc", {"title": 1}, True, -3, "x.7", [7]])
def test_bad_project_ids(value):
    with pytest.raises(DataError, match="project id"):
        project_id_of(value)
