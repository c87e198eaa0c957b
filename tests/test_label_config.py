"""The label config parser on served and unservable Label Studio configs."""

import pytest

from ml_backend.labelstudio.label_config import ConfigKind, parse_label_config
from model.errors import ConfigError

TAXONOMY = """
<View>
  <Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true" maxUsages="1">
    <Choice value="Animal">
      <Choice value="Mammal"><Choice value="Cat"/><Choice value="Dog" alias="dog"/></Choice>
      <Choice value="Bird"/>
    </Choice>
    <Choice value="Plant"/>
  </Taxonomy>
</View>
"""


def test_ragged_taxonomy_with_alias_leafs_only_and_max_usages():
    cfg = parse_label_config(TAXONOMY)
    assert cfg.kind is ConfigKind.TAXONOMY
    assert (cfg.from_name, cfg.to_name, cfg.image_key, cfg.result_type) == ("taxonomy", "image", "image", "taxonomy")
    assert cfg.leafs_only is True and cfg.max_usages == 1
    leaves = sorted(n.path for n in cfg.taxonomy.leaves())
    assert leaves == [("Animal", "Bird"), ("Animal", "Mammal", "Cat"), ("Animal", "Mammal", "dog"), ("Plant",)]
    assert cfg.taxonomy.depth == 3
    assert cfg.taxonomy.resolve(("Animal", "Mammal", "Dog")) == ("Animal", "Mammal", "dog")


def test_defaults_of_taxonomy_attributes_and_data_key():
    xml = """<View><Image name="img" value="$photo_url"/>
      <Taxonomy name="t" toName="img"><Choice value="A"><Choice value="A1"/></Choice><Choice value="B"/></Taxonomy>
    </View>"""
    cfg = parse_label_config(xml)
    assert cfg.leafs_only is False and cfg.max_usages is None
    assert cfg.image_key == "photo_url" and cfg.to_name == "img"


def test_flat_choices_is_a_one_level_taxonomy():
    xml = """<View><Image name="image" value="$image"/>
      <Choices name="label" toName="image" choice="single"><Choice value="Cat"/><Choice value="Dog" alias="d"/></Choices>
    </View>"""
    cfg = parse_label_config(xml)
    assert cfg.kind is ConfigKind.CHOICES and cfg.result_type == "choices"
    assert cfg.taxonomy.depth == 1 and [n.name for n in cfg.taxonomy.leaves()] == ["Cat", "d"]
    assert cfg.leafs_only is True and cfg.max_usages == 1


def test_multiple_choice_has_no_usage_limit_and_layout_views_are_skipped():
    xml = """<View><Image name="image" value="$image"/>
      <Choices name="label" toName="image" choice="multiple"><View><Choice value="A"/></View><Choice value="B"/></Choices>
    </View>"""
    cfg = parse_label_config(xml)
    assert cfg.max_usages is None and len(cfg.taxonomy.leaves()) == 2


def test_taxonomy_wins_over_side_choices():
    xml = """<View><Image name="image" value="$image"/>
      <Choices name="quality" toName="image"><Choice value="good"/><Choice value="bad"/></Choices>
      <Taxonomy name="tax" toName="image"><Choice value="A"/><Choice value="B"/></Taxonomy>
    </View>"""
    assert parse_label_config(xml).from_name == "tax"


def test_lowercase_tags_and_to_name_list():
    xml = """<view><image name="image" value="$image"/><text name="t" value="$text"/>
      <taxonomy name="tax" toName="t,image"><choice value="A"/><choice value="B"/></taxonomy></view>"""
    cfg = parse_label_config(xml)
    assert cfg.to_name == "image" and cfg.kind is ConfigKind.TAXONOMY


def test_result_is_cached_per_text():
    assert parse_label_config(TAXONOMY) is parse_label_config(TAXONOMY)
    assert parse_label_config(TAXONOMY).config_hash != parse_label_config(TAXONOMY + " ").config_hash


@pytest.mark.parametrize(
    "xml, words",
    [
        ("<View><Image name='image' value='$image'", ["not valid XML"]),
        ("", ["empty"]),
        ("<View><Taxonomy name='t' toName='x'><Choice value='A'/><Choice value='B'/></Taxonomy></View>", ["no <Image>"]),
        ("<View><Image name='image' value='$image'/></View>", ["no <Taxonomy> or <Choices>"]),
        (
            "<View><Image name='image' value='$image'/><Taxonomy name='t' toName='picture'>"
            "<Choice value='A'/><Choice value='B'/></Taxonomy></View>",
            ["toName=\"picture\"", "'image'"],
        ),
        (
            "<View><Image name='image' value='$image'/><Choices name='c' toName='image'><Choice value='A'/></Choices></View>",
            ['<Choices name="c">', "at least two"],
        ),
        (
            "<View><Image name='image' value='$image'/>"
            "<Taxonomy name='t1' toName='image'><Choice value='A'/><Choice value='B'/></Taxonomy>"
            "<Taxonomy name='t2' toName='image'><Choice value='A'/><Choice value='B'/></Taxonomy></View>",
            ["t1", "t2", "single <Taxonomy>"],
        ),
        (
            "<View><Image name='image' value='$image'/>"
            "<Choices name='c1' toName='image'><Choice value='A'/><Choice value='B'/></Choices>"
            "<Choices name='c2' toName='image'><Choice value='A'/><Choice value='B'/></Choices></View>",
            ["c1", "c2"],
        ),
        (
            "<View><Image name='image' value='$image'/><Taxonomy name='t' toName='image' leafsOnly='maybe'>"
            "<Choice value='A'/><Choice value='B'/></Taxonomy></View>",
            ["leafsOnly=\"maybe\"", "true"],
        ),
        (
            "<View><Image name='image' value='$image'/><Taxonomy name='t' toName='image' maxUsages='0'>"
            "<Choice value='A'/><Choice value='B'/></Taxonomy></View>",
            ["maxUsages"],
        ),
        (
            "<View><Image name='image' value='$image'/><Taxonomy name='t' toName='image'>"
            "<Choice value='A'/><Choice value='A'/></Taxonomy></View>",
            ['<Taxonomy name="t">', "twice"],
        ),
        (
            "<View><Image name='image' value='image'/><Taxonomy name='t' toName='image'>"
            "<Choice value='A'/><Choice value='B'/></Taxonomy></View>",
            ["$image"],
        ),
        (
            "<View><Image name='image' value='$image'/><Choices name='c' toName='image'>"
            "<Choice value='A'><Choice value='A1'/></Choice><Choice value='B'/></Choices></View>",
            ["use <Taxonomy>"],
        ),
        (
            "<View><Image name='image' value='$image'/><Taxonomy name='t' toName='image' apiUrl='http://x'/></View>",
            ["dynamically"],
        ),
        (
            "<View><Image name='image' value='$image'/><Text name='txt' value='$t'/>"
            "<Choices name='c' toName='txt'><Choice value='A'/><Choice value='B'/></Choices></View>",
            ["points at an <Image>"],
        ),
    ],
)
def test_unservable_configs_name_the_cause(xml, words):
    with pytest.raises(ConfigError) as err:
        parse_label_config(xml)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
