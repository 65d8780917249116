import pytest

from backend.label_config import UnsupportedConfig, parse_label_config
from backend.training_data import MissingTextField, latest_label, project_data

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


@pytest.mark.parametrize(
    "xml, fragment",
    [
        ("", "empty"),
        ("<View><Text", "not valid XML"),
        ('<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="a"/>'
         '<Choice value="b"/></Choices></View>', "0 <Text>"),
        (TEXT_CONFIG.replace('choice="single"', 'choice="multiple"'), "multi-choice"),
        (TEXT_CONFIG.replace('toName="text"', 'toName="other"'), "does not point"),
        (TEXT_CONFIG.replace("</View>", '<Labels name="l" toName="text"><Label value="x"/></Labels></View>'),
         "unsupported controls"),
        (TEXT_CONFIG.replace('<Choice value="Negative"/>', ""), "at least two"),
    ],
)
def test_unsupported_configs_say_what_is_supported(xml, fragment):
    with pytest.raises(UnsupportedConfig) as error:
        parse_label_config(xml)
    assert fragment in str(error.value)
    assert "supports a label config with exactly one <Text>" in str(error.value)


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
