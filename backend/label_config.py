"""Reading a Label Studio label config: which data field holds the text, which choices exist."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

SUPPORTED = (
    "this backend supports a label config with exactly one <Text> or <HyperText> object "
    "and one single-choice <Choices> control pointing at it (toName), each <Choice> with a value"
)


class UnsupportedConfig(ValueError):
    """The project's labeling interface is not a single-choice text classification."""


@dataclass(frozen=True)
class LabelConfig:
    from_name: str  # the <Choices name="...">
    to_name: str  # the <Text name="...">
    data_key: str  # the task data field, `$text` -> "text"
    object_type: str  # "Text" or "HyperText"
    choices: tuple[str, ...]

    def result_for(self, choice: str) -> list[dict]:
        """A Label Studio result list that selects `choice`."""
        return [
            {
                "from_name": self.from_name,
                "to_name": self.to_name,
                "type": "choices",
                "value": {"choices": [choice]},
            }
        ]

    def choice_of(self, result: list) -> str | None:
        """The chosen value in an annotation result, or None if it chose nothing we know."""
        for region in result or []:
            if not isinstance(region, dict) or region.get("from_name") != self.from_name:
                continue
            picked = (region.get("value") or {}).get("choices") or []
            if len(picked) == 1 and picked[0] in self.choices:
                return picked[0]
        return None

    def to_dict(self) -> dict:
        return {
            "from_name": self.from_name,
            "to_name": self.to_name,
            "data_key": self.data_key,
            "object_type": self.object_type,
            "choices": list(self.choices),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LabelConfig":
        return cls(
            from_name=data["from_name"],
            to_name=data["to_name"],
            data_key=data["data_key"],
            object_type=data["object_type"],
            choices=tuple(data["choices"]),
        )


def parse_label_config(xml: str) -> LabelConfig:
    """Parse and validate; raises UnsupportedConfig with a message saying what is supported."""
    if not isinstance(xml, str) or not xml.strip():
        raise UnsupportedConfig(f"the label config is empty; {SUPPORTED}")
    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, UnicodeEncodeError) as exc:  # lone surrogates cannot be UTF-8
        raise UnsupportedConfig(f"the label config is not valid XML ({exc}); {SUPPORTED}") from None

    objects = [el for el in root.iter() if el.tag in ("Text", "HyperText")]
    controls = [el for el in root.iter() if el.tag == "Choices"]
    other_controls = sorted(
        {el.tag for el in root.iter()}
        & {"Labels", "Rating", "TextArea", "Taxonomy", "RectangleLabels", "Number", "Pairwise"}
    )
    if len(objects) != 1:
        raise UnsupportedConfig(f"found {len(objects)} <Text>/<HyperText> objects; {SUPPORTED}")
    if len(controls) != 1:
        raise UnsupportedConfig(f"found {len(controls)} <Choices> controls; {SUPPORTED}")
    if other_controls:
        raise UnsupportedConfig(f"found unsupported controls {other_controls}; {SUPPORTED}")
    obj, control = objects[0], controls[0]
    name, value = obj.get("name"), obj.get("value", "")
    if not name or not value.startswith("$") or len(value) < 2:
        raise UnsupportedConfig(
            f"the <{obj.tag}> needs a name and a value like \"$text\"; {SUPPORTED}"
        )
    if control.get("toName") != name:
        raise UnsupportedConfig(
            f"<Choices toName=\"{control.get('toName')}\"> does not point at <{obj.tag} "
            f"name=\"{name}\">; {SUPPORTED}"
        )
    if control.get("choice", "single") != "single":
        raise UnsupportedConfig(f"<Choices choice=\"{control.get('choice')}\"> is multi-choice; {SUPPORTED}")
    choices = tuple(
        c.get("alias") or c.get("value") for c in control.iter("Choice") if c.get("alias") or c.get("value")
    )
    if len(choices) < 2 or len(set(choices)) != len(choices):
        raise UnsupportedConfig(f"need at least two distinct <Choice> values, found {list(choices)}; {SUPPORTED}")
    if not control.get("name"):
        raise UnsupportedConfig(f"the <Choices> control has no name; {SUPPORTED}")
    return LabelConfig(
        from_name=control.get("name"),
        to_name=name,
        data_key=value[1:],
        object_type=obj.tag,
        choices=choices,
    )
