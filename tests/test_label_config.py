import pytest

from backend.label_config import LabelConfig, UnsupportedConfig, parse_label_config
from backend.training_data import (
    MissingTextField,
    control_specs,
    control_targets,
    latest_answers,
    latest_label,
    project_data,
)

TEXT_CONFIG = """<View>
  <Text name="text" value="$review"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/><Choice value="Negative"/>
  </Choices>
</View>"""


def test_text_classification_config_is_read():
    config = parse_label_config(TEXT_CONFIG)
    assert config.from_name == "sentiment"
    assert config.to_name == "text"
    assert config.data_key == "review"
    assert config.choices == ("Positive", "Negative")
    assert config.result_for("Negative") == [
        {"from_name": "sentiment", "to_name": "text", "type": "choices",
         "value": {"choices": ["Negative"]}}
    ]


def test_hypertext_is_supported():
    config = parse_label_config(TEXT_CONFIG.replace("<Text ", "<HyperText "))
    assert config.object_type == "HyperText"


def test_every_single_choice_variant_is_single_choice():
    for variant in ('choice="single"', 'choice="single-radio"', ""):
        config = parse_label_config(TEXT_CONFIG.replace('choice="single"', variant))
        assert config.controls[0].multi_label is False, variant
        assert config.ignored == ()


MULTI_CONFIG = """<View>
  <Header value="Read the title and the body"/>
  <Text name="title" value="$title"/>
  <HyperText name="body" value="$html"/>
  <Choices name="topic" toName="title,body" choice="multiple">
    <Choice value="Sports"/><Choice value="Politics"/><Choice value="Tech" alias="tech"/>
  </Choices>
  <Choices name="urgency" toName="body" choice="single-radio">
    <Choice value="High"/><Choice value="Low"/>
  </Choices>
  <View visibleWhen="choice-selected" whenTagName="urgency" whenChoiceValue="High">
    <Choices name="why" toName="body" visibleWhen="choice-selected" whenTagName="urgency"
             whenChoiceValue="High"><Choice value="Outage"/><Choice value="Deadline"/></Choices>
  </View>
  <TextArea name="comment" toName="body"/>
  <Rating name="stars" toName="body"/>
  <Number name="count" toName="body"/>
  <Labels name="entities" toName="body"><Label value="PER"/></Labels>
  <Taxonomy name="tree" toName="body"><Choice value="A"/></Taxonomy>
  <Image name="picture" valueList="$images"/>
  <Choices name="photo" toName="picture"><Choice value="x"/><Choice value="y"/></Choices>
</View>"""


def test_several_controls_objects_and_conditionals_are_read_and_the_rest_is_ignored():
    config = parse_label_config(MULTI_CONFIG)
    assert [c.name for c in config.controls] == ["topic", "urgency", "why"]
    topic, urgency, why = config.controls
    assert topic.multi_label and not urgency.multi_label and not why.multi_label
    assert topic.to_names == ("title", "body") and topic.to_name == "title"
    assert topic.choices == ("Sports", "Politics", "tech")  # an alias is what results carry
    assert [(o.name, o.data_key, o.object_type) for o in config.objects] == [
        ("title", "title", "Text"), ("body", "html", "HyperText")]
    ignored = {i.name: (i.tag, i.reason) for i in config.ignored}
    assert set(ignored) == {"comment", "stars", "count", "entities", "tree", "photo"}
    assert ignored["comment"][0] == "TextArea" and "learns only <Choices>" in ignored["comment"][1]
    assert "gallery (valueList)" in ignored["photo"][1]
    assert config.ignored_summary[0] == {"name": "comment", "tag": "TextArea",
                                         "reason": ignored["comment"][1]}
    # The single-control view is the first control.
    assert (config.from_name, config.to_name, config.data_key) == ("topic", "title", "title")


def test_results_one_per_control_multi_label_as_a_list():
    config = parse_label_config(MULTI_CONFIG)
    results = config.results_for({"topic": {"tech", "Sports"}, "urgency": "High", "why": None})
    assert results == [
        {"from_name": "topic", "to_name": "title", "type": "choices",
         "value": {"choices": ["Sports", "tech"]}},
        {"from_name": "urgency", "to_name": "body", "type": "choices", "value": {"choices": ["High"]}},
    ]
    # What the SDK itself accepts as a prediction for this config.
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(MULTI_CONFIG)
    assert interface.validate_prediction({"result": results}, return_errors=True) == []
    wrong = [dict(results[1], value={"choices": ["Medium"]})]
    assert interface.validate_prediction({"result": wrong}, return_errors=True) != []
    with pytest.raises(ValueError, match="cannot select"):
        config.control("urgency").result({"High", "Low"})
    with pytest.raises(ValueError, match="cannot select"):
        config.control("topic").result({"Cooking"})


def test_config_round_trips_through_its_dict_and_reads_the_old_format():
    config = parse_label_config(MULTI_CONFIG)
    assert LabelConfig.from_dict(config.to_dict()) == config
    single = parse_label_config(TEXT_CONFIG)
    old = {k: single.to_dict()[k] for k in ("from_name", "to_name", "data_key", "object_type", "choices")}
    assert LabelConfig.from_dict(old) == single


LEARNABLE = "this backend supports a label config with one or more <Choices> controls"
IMAGE_CHOICES = ('<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="a"/>'
                 '<Choice value="b"/></Choices></View>')


@pytest.mark.parametrize(
    "xml, fragment",
    [
        ("", "empty"),
        ("<View><Text", "not valid XML"),
        ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x "y">]><View/>', "declares a DTD"),
        ('<View><Text name="t" value="$t"/></View>', "found no <Choices> control"),
        (IMAGE_CHOICES.replace("<Image ", "<Audio "), "neither text nor an image"),
        (IMAGE_CHOICES.replace('value="$img"', 'value="https://example.org/cat.jpg"'),
         "shows a fixed image, not a task field"),
        (IMAGE_CHOICES.replace('value="$img"', 'valueList="$imgs"'), "gallery (valueList)"),
        (TEXT_CONFIG.replace('toName="text"', 'toName="other"'), 'toName "other" names no object'),
        (TEXT_CONFIG.replace('value="$review"', 'value="Read this"'), "shows fixed text, not a task field"),
        (TEXT_CONFIG.replace('<Choice value="Negative"/>', ""), "needs at least two"),
        (TEXT_CONFIG.replace('choice="single"', 'value="$options"'), "takes its choices from the task data"),
        (TEXT_CONFIG.replace('choice="single"', 'perRegion="true"'), "classifies regions"),
        ('<View><Text name="t" value="$t"/><TextArea name="c" toName="t"/>'
         '<Rating name="r" toName="t"/></View>', "no control this backend can learn"),
    ],
)
def test_unsupported_configs_say_what_is_supported(xml, fragment):
    with pytest.raises(UnsupportedConfig) as error:
        parse_label_config(xml)
    assert fragment in str(error.value)
    assert LEARNABLE in str(error.value)


def test_a_refusal_names_each_control_and_its_reason():
    xml = '<View><Text name="t" value="$t"/><TextArea name="note" toName="t"/></View>'
    with pytest.raises(UnsupportedConfig, match=r'<TextArea name="note">: a <TextArea> is not a classification'):
        parse_label_config(xml)


def _annotation(choice, updated, cancelled=False, id_=1):
    return {
        "id": id_,
        "was_cancelled": cancelled,
        "updated_at": updated,
        "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                    "value": {"choices": [choice]}}],
    }


def test_newest_annotation_wins_and_cancelled_ones_are_skipped():
    config = parse_label_config(TEXT_CONFIG)
    task = {"id": 1, "data": {"review": "x"}, "annotations": [
        _annotation("Positive", "2026-01-01T10:00:00Z", id_=1),
        _annotation("Negative", "2026-01-02T10:00:00Z", id_=2),
        _annotation("Positive", "2026-01-03T10:00:00Z", cancelled=True, id_=3),
    ]}
    assert latest_label(task, config) == "Negative"
    task["annotations"].append(_annotation("Positive", "2026-01-04T00:00:00Z", id_=4))
    assert latest_label(task, config) == "Positive"


def test_only_cancelled_or_unknown_choices_leave_a_task_unlabeled():
    config = parse_label_config(TEXT_CONFIG)
    task = {"id": 1, "data": {"review": "x"}, "annotations": [
        _annotation("Positive", "2026-01-01", cancelled=True),
        _annotation("Meh", "2026-01-02"),
    ]}
    assert latest_label(task, config) is None


def test_project_data_and_missing_text_field():
    config = parse_label_config(TEXT_CONFIG)
    tasks = [
        {"id": 5, "data": {"review": "good"}, "annotations": [_annotation("Positive", "2026")]},
        {"id": 6, "data": {"review": "bad"}, "annotations": []},
    ]
    data = project_data(tasks, config)
    assert data.task_ids == [5, 6]
    assert data.labels == ["Positive", None]
    assert data.labeled_index == [0]
    with pytest.raises(MissingTextField, match="no data field 'review'"):
        project_data([{"id": 7, "data": {"text": "wrong key"}}], config)


def _multi_annotation(result, updated, id_, cancelled=False):
    return {"id": id_, "was_cancelled": cancelled, "updated_at": updated, "result": result}


def test_answers_come_from_the_newest_annotation_that_answers_any_control():
    config = parse_label_config(MULTI_CONFIG)
    topic, urgency, why = config.controls
    task = {"id": 1, "data": {"title": "t", "html": "<p>b</p>"}, "annotations": [
        _multi_annotation([topic.result({"Sports"}), urgency.result("High"), why.result("Outage")],
                          "2026-01-01", 1),
        # Newer: urgency and topic answered, the conditional "why" hidden; an unknown value
        # in a multi-label answer is dropped, the known ones kept.
        _multi_annotation([{"from_name": "topic", "to_name": "title", "type": "choices",
                            "value": {"choices": ["Politics", "Cooking"]}}, urgency.result("Low"),
                           {"from_name": "comment", "to_name": "body", "type": "textarea",
                            "value": {"text": ["free text"]}}], "2026-01-02", 2),
        # Newest, but answers nothing we learn: skipped.
        _multi_annotation([{"from_name": "comment", "to_name": "body", "type": "textarea",
                            "value": {"text": ["only a comment"]}}], "2026-01-03", 3),
        _multi_annotation([urgency.result("High")], "2026-01-04", 4, cancelled=True),
    ]}
    assert latest_answers(task, config) == {"topic": frozenset({"Politics"}), "urgency": "Low", "why": None}


def test_project_data_gives_texts_per_object_and_answers_per_control():
    config = parse_label_config(MULTI_CONFIG)
    topic, urgency, _ = config.controls
    tasks = [
        {"id": 5, "data": {"title": "a title", "html": "a body"},
         "annotations": [_multi_annotation([urgency.result("High")], "2026", 1)]},
        {"id": 6, "data": {"title": "t2", "html": "b2"}, "annotations": []},
        {"id": 7, "data": {"title": "t3", "html": "b3"},
         "annotations": [_multi_annotation([topic.result(["Sports", "tech"])], "2026", 2)]},
    ]
    data = project_data(tasks, config)
    assert data.object_texts == {"title": ["a title", "t2", "t3"], "body": ["a body", "b2", "b3"]}
    assert data.texts == ["a title", "t2", "t3"]  # the first control's first object
    assert data.labeled_index == [0, 2]
    assert data.answered_index("topic") == [2] and data.answered_index("urgency") == [0]
    assert data.answers[2]["topic"] == frozenset({"Sports", "tech"})
    assert data.labels == [None, None, frozenset({"Sports", "tech"})]
    specs = control_specs(config)
    assert [(s.name, s.multi_label, s.inputs) for s in specs] == [
        ("topic", True, ["title", "body"]), ("urgency", False, ["body"]), ("why", False, ["body"])]
    topic_t, urgency_t, why_t = control_targets(data, config)
    assert topic_t.tolist() == [[-1, -1, -1], [-1, -1, -1], [1, 0, 1]]
    assert urgency_t.tolist() == [0, -1, -1] and why_t.tolist() == [-1, -1, -1]
    with pytest.raises(MissingTextField, match="no data field 'html'"):
        project_data([{"id": 8, "data": {"title": "no body"}}], config)


IMAGE_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Choices name="animal" toName="image" choice="single-radio" required="true">
    <Choice value="Cat"/><Choice value="Dog"/><Choice value="Bird" alias="bird"/>
  </Choices>
  <Choices name="tags" toName="image" choice="multiple">
    <Choice value="Indoor"/><Choice value="Outdoor"/><Choice value="Blurry"/>
  </Choices>
  <RectangleLabels name="boxes" toName="image"><Label value="Cat"/></RectangleLabels>
  <Choices name="region" toName="image" perRegion="true"><Choice value="a"/><Choice value="b"/></Choices>
</View>"""


def test_image_classification_single_and_multi_label_are_learned():
    config = parse_label_config(IMAGE_CONFIG)
    assert [(c.name, c.multi_label, c.to_names) for c in config.controls] == [
        ("animal", False, ("image",)), ("tags", True, ("image",))]
    assert config.controls[0].choices == ("Cat", "Dog", "bird")
    (image,) = config.objects
    assert (image.name, image.data_key, image.object_type, image.is_image) == ("image", "image", "Image", True)
    assert config.image_objects == (image,) and config.text_objects == ()
    ignored = {i.name: (i.tag, i.reason) for i in config.ignored}
    assert set(ignored) == {"boxes", "region"}
    assert "not a classification" in ignored["boxes"][1] and "perRegion" in ignored["region"][1]
    assert config.results_for({"animal": "bird", "tags": {"Outdoor", "Indoor"}}) == [
        {"from_name": "animal", "to_name": "image", "type": "choices", "value": {"choices": ["bird"]}},
        {"from_name": "tags", "to_name": "image", "type": "choices", "value": {"choices": ["Indoor", "Outdoor"]}},
    ]
    from label_studio_sdk.label_interface import LabelInterface

    results = config.results_for({"animal": "Cat", "tags": {"Blurry"}})
    assert LabelInterface(IMAGE_CONFIG).validate_prediction({"result": results}, return_errors=True) == []
    assert LabelConfig.from_dict(config.to_dict()) == config


def test_a_control_over_an_image_and_a_caption_reads_both():
    xml = """<View>
      <Image name="photo" value="$url"/><Text name="caption" value="$caption"/>
      <Choices name="topic" toName="photo,caption"><Choice value="News"/><Choice value="Ad"/></Choices>
      <Choices name="tone" toName="caption"><Choice value="Calm"/><Choice value="Loud"/></Choices>
    </View>"""
    config = parse_label_config(xml)
    assert [c.to_names for c in config.controls] == [("photo", "caption"), ("caption",)]
    assert [(o.name, o.object_type) for o in config.image_objects] == [("photo", "Image")]
    assert [(o.name, o.object_type) for o in config.text_objects] == [("caption", "Text")]
    tasks = [{"id": 1, "data": {"url": "/data/upload/1/a.jpg", "caption": "hello"}},
             {"id": 2, "data": {"caption": "no image field"}}]
    data = project_data(tasks, config)
    assert data.object_texts["photo"] == ["/data/upload/1/a.jpg", ""]  # a missing image: a per-task error later
    assert data.object_texts["caption"] == ["hello", "no image field"]
    with pytest.raises(MissingTextField, match="no data field 'caption'"):
        project_data([{"id": 3, "data": {"url": "x.jpg"}}], config)


def test_an_image_only_config_with_no_learnable_control_is_refused_with_the_reasons():
    xml = ('<View><Image name="i" value="$img"/><RectangleLabels name="b" toName="i">'
           '<Label value="Car"/></RectangleLabels></View>')
    with pytest.raises(UnsupportedConfig, match=r'<RectangleLabels name="b">: a <RectangleLabels> is not'):
        parse_label_config(xml)
