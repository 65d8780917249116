"""Reading a Label Studio label config: which classification questions we learn, on which data.

The config is read with the SDK's own `label_studio_sdk.label_interface.LabelInterface`, the
parser Label Studio's tooling uses, so tag names, `toName` lists, `alias` values and the
`choice` attribute mean here what they mean there. On top of it this module decides what
the backend can learn:

* every `<Choices>` control with at least two fixed `<Choice>` values whose `toName` names
  only `<Text>`/`<HyperText>` objects or `<Image>` objects reading a task field
  (`value="$field"`) becomes a head: single-choice (`choice="single"`, `"single-radio"` or
  none; the SDK's `is_multiple_choice` is the test) or multi-label (`choice="multiple"`).
  A text object is read by the text encoder, an image object by the image encoder
  (`model.image_encoder`, its file fetched by `backend.images`); a control over both reads
  their vectors side by side;
* conditional controls (`visibleWhen`, `whenTagName`/`whenChoiceValue`) are learned like the
  others: a head trains only on the tasks whose annotation answers it;
* every other control (`TextArea`, `Rating`, `Number`, `Labels`, `RectangleLabels`,
  `Taxonomy`, a `<Choices>` per region or on an `<Image valueList>` gallery, on audio or
  video, ...) is **ignored** and listed in `LabelConfig.ignored`, with the reason,
  as long as one learnable control remains; a config with none is refused
  (`UnsupportedConfig`) with a message that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED = (
    "this backend supports a label config with one or more <Choices> controls (single- or "
    "multiple-choice, at least two <Choice> values each) whose toName points at <Text>, "
    "<HyperText> or <Image> objects that read a task field (value=\"$field\"); other controls "
    "are ignored"
)
TEXT_OBJECTS = ("Text", "HyperText")
IMAGE_OBJECTS = ("Image",)


class UnsupportedConfig(ValueError):
    """The project's labeling interface has no classification control this backend can learn."""


@dataclass(frozen=True)
class TextObject:
    """An object a control reads: `<Text>`/`<HyperText>` (a task's text) or `<Image>` (the
    URL or path of a task's image). The name stays from when only text was learned."""

    name: str  # <Text name="...">, <Image name="...">
    data_key: str  # the task data field, `$text` -> "text"
    object_type: str  # "Text", "HyperText" or "Image"

    @property
    def is_image(self) -> bool:
        """An image: its vectors come from the image encoder, not the text encoder."""
        return self.object_type in IMAGE_OBJECTS


@dataclass(frozen=True)
class ChoicesControl:
    """One learnable `<Choices>` control: one head of the model."""

    name: str  # <Choices name="..."> (a result's from_name)
    to_names: tuple[str, ...]  # the text objects it names, in toName order
    choices: tuple[str, ...]  # alias or value of each <Choice>, in config order
    multi_label: bool  # choice="multiple"

    @property
    def to_name(self) -> str:
        """The result's `to_name`: the first object named, as the SDK's regions do (a
        comma-joined list names no tag the labeling screen could attach the result to)."""
        return self.to_names[0]

    def result(self, answer) -> dict:
        """One Label Studio result selecting `answer` (a choice, or several for multi-label)."""
        wanted = [answer] if isinstance(answer, str) else list(answer)
        unknown = [c for c in wanted if c not in self.choices]
        picked = [c for c in self.choices if c in set(wanted)]  # config order, no repeats
        if unknown or not picked or (len(picked) > 1 and not self.multi_label):
            raise ValueError(f"<Choices name={self.name!r}> cannot select {picked!r}; "
                             f"its choices are {list(self.choices)}")
        return {"from_name": self.name, "to_name": self.to_name, "type": "choices",
                "value": {"choices": picked}}

    def answer_in(self, result: list):
        """This control's answer in an annotation result: the choice (single-choice), the
        frozenset of known choices picked (multi-label), or None when it is not answered with
        a value we know."""
        for region in result or []:
            if not isinstance(region, dict) or region.get("from_name") != self.name:
                continue
            picked = (region.get("value") or {}).get("choices") or []
            if not isinstance(picked, list):
                continue
            if self.multi_label:
                known = frozenset(c for c in picked if isinstance(c, str) and c in self.choices)
                if known:
                    return known
            elif len(picked) == 1 and picked[0] in self.choices:
                return picked[0]
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, "to_names": list(self.to_names), "choices": list(self.choices),
                "multi_label": self.multi_label}


@dataclass(frozen=True)
class IgnoredControl:
    """A control of the config that no head learns, and why (shown by /setup and jobs)."""

    name: str
    tag: str
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "tag": self.tag, "reason": self.reason}


@dataclass(frozen=True)
class LabelConfig:
    """The learnable part of a label config.

    `controls` are the heads, in config order; `objects` the text objects they read.
    The single-control view of earlier versions (`from_name`, `to_name`, `data_key`,
    `object_type`, `choices`, `result_for`, `choice_of`) describes the first control and its
    first object.
    """

    controls: tuple[ChoicesControl, ...]
    objects: tuple[TextObject, ...]
    ignored: tuple[IgnoredControl, ...] = field(default=())

    # -- the multi-control view ------------------------------------------------------------
    def control(self, name: str) -> ChoicesControl:
        for control in self.controls:
            if control.name == name:
                return control
        raise KeyError(f"no learnable <Choices name={name!r}> in the label config")

    def object(self, name: str) -> TextObject:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(f"no text or image object {name!r} in the label config")

    @property
    def image_objects(self) -> tuple[TextObject, ...]:
        """The `<Image>` objects the controls read (encoded by the image encoder)."""
        return tuple(obj for obj in self.objects if obj.is_image)

    @property
    def text_objects(self) -> tuple[TextObject, ...]:
        """The `<Text>`/`<HyperText>` objects the controls read (encoded by the text encoder)."""
        return tuple(obj for obj in self.objects if not obj.is_image)

    def results_for(self, answers: dict) -> list[dict]:
        """One Label Studio result per control given an answer in `answers` (control name ->
        choice, or iterable of choices for multi-label), in config order."""
        return [control.result(answers[control.name]) for control in self.controls
                if answers.get(control.name) is not None]

    def answers_in(self, result: list) -> dict:
        """Control name -> answer (None where unanswered) in one annotation result."""
        return {control.name: control.answer_in(result) for control in self.controls}

    @property
    def ignored_summary(self) -> list[dict]:
        """The ignored controls as plain dicts, for /setup and the job result."""
        return [item.to_dict() for item in self.ignored]

    # -- the single-control view (the first control) ---------------------------------------
    @property
    def primary(self) -> ChoicesControl:
        return self.controls[0]

    @property
    def from_name(self) -> str:
        return self.primary.name

    @property
    def to_name(self) -> str:
        return self.primary.to_name

    @property
    def data_key(self) -> str:
        return self.object(self.primary.to_names[0]).data_key

    @property
    def object_type(self) -> str:
        return self.object(self.primary.to_names[0]).object_type

    @property
    def choices(self) -> tuple[str, ...]:
        return self.primary.choices

    def result_for(self, choice) -> list[dict]:
        """A Label Studio result list that selects `choice` in the first control."""
        return [self.primary.result(choice)]

    def choice_of(self, result: list):
        """The first control's answer in an annotation result, or None."""
        return self.primary.answer_in(result)

    # -- storage (a model version's meta.json) ---------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON. The flat keys of the single-control format stay, so a reader of the
        older format still finds the first control."""
        return {
            "from_name": self.from_name,
            "to_name": self.to_name,
            "data_key": self.data_key,
            "object_type": self.object_type,
            "choices": list(self.choices),
            "controls": [control.to_dict() for control in self.controls],
            "objects": [{"name": o.name, "data_key": o.data_key, "object_type": o.object_type}
                        for o in self.objects],
            "ignored": self.ignored_summary,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LabelConfig:
        """From `to_dict`'s output, or from the single-control format of older versions."""
        if "controls" not in data:
            return cls(
                controls=(ChoicesControl(name=data["from_name"], to_names=(data["to_name"],),
                                         choices=tuple(data["choices"]), multi_label=False),),
                objects=(TextObject(name=data["to_name"], data_key=data["data_key"],
                                    object_type=data["object_type"]),),
            )
        return cls(
            controls=tuple(ChoicesControl(name=c["name"], to_names=tuple(c["to_names"]),
                                          choices=tuple(c["choices"]), multi_label=bool(c["multi_label"]))
                           for c in data["controls"]),
            objects=tuple(TextObject(**o) for o in data["objects"]),
            ignored=tuple(IgnoredControl(**i) for i in data.get("ignored", [])),
        )


def _reject_dtd(xml: str) -> None:
    """Refuse a document type declaration before the SDK parses the config.

    The SDK parses with lxml's default parser, which expands internal entities (a "billion
    laughs" config costs the web worker its memory or, with libxml2's amplification guard,
    half a second of every /setup). Label Studio configs never need a DTD, and without one
    no entity can be declared, so a DTD is refused before anything parses it.
    """
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise UnsupportedConfig(
            f"the label config declares a DTD (<!DOCTYPE ...>); Label Studio configs need none, "
            f"remove it; {SUPPORTED}"
        )


def _why_not_learnable(control, objects: dict) -> str | None:
    """Why a control cannot become a head, or None when it can."""
    from label_studio_sdk.label_interface.control_tags import ChoicesTag

    if not isinstance(control, ChoicesTag):
        return f"a <{control.tag}> is not a classification; this backend learns only <Choices>"
    if control.attr.get("perRegion") in ("true", True):
        return "it classifies regions (perRegion), not whole tasks"
    if str(control.attr.get("value", "")).startswith("$"):
        return (f"it takes its choices from the task data (value=\"{control.attr['value']}\"); "
                f"list them as <Choice> tags")
    for name in control.to_name:
        obj = objects.get(name)
        if obj is None:
            return f"its toName \"{name}\" names no object of the config"
        if obj.tag not in TEXT_OBJECTS + IMAGE_OBJECTS:
            return (f"it points at <{obj.tag} name=\"{name}\">, which is neither text nor an image; "
                    f"point it at a <Text>, <HyperText> or <Image>")
        if obj.tag in IMAGE_OBJECTS and obj.attr.get("valueList"):
            return (f"<Image name=\"{name}\"> shows a gallery (valueList), and this backend "
                    f"classifies one image per task; use value=\"$image\"")
        if not str(obj.value or "").startswith("$") or len(obj.value) < 2:
            example = "$image" if obj.tag in IMAGE_OBJECTS else "$text"
            shown = "a fixed image" if obj.tag in IMAGE_OBJECTS else "fixed text"
            return (f"<{obj.tag} name=\"{name}\"> shows {shown}, not a task field; "
                    f"give it a value like \"{example}\"")
    if len(control.labels or []) < 2:
        return f"it has {len(control.labels or [])} <Choice> value(s); a classifier needs at least two"
    return None


def parse_label_config(xml: str) -> LabelConfig:
    """Parse and validate; raises UnsupportedConfig with a message saying what is supported.

    Cheap enough for every /setup call (Label Studio sends one before each predict batch).
    """
    from label_studio_sdk.label_interface import LabelInterface

    if not isinstance(xml, str) or not xml.strip():
        raise UnsupportedConfig(f"the label config is empty; {SUPPORTED}")
    _reject_dtd(xml)
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own XML error, lxml's ValueErrors, bare Exceptions
        # A lone surrogate ("\ud800") cannot be UTF-8: lxml says so with a UnicodeError.
        what = "is not valid XML" if "Syntax" in type(exc).__name__ or isinstance(exc, ValueError) \
            else "could not be read"
        raise UnsupportedConfig(f"the label config {what} ({str(exc)[:200]}); {SUPPORTED}") from None
    objects = {obj.name: obj for obj in (interface.objects or [])}
    learnable: list[ChoicesControl] = []
    ignored: list[IgnoredControl] = []
    for control in interface.controls or []:
        reason = _why_not_learnable(control, objects)
        if reason is not None:
            ignored.append(IgnoredControl(name=control.name, tag=control.tag, reason=reason))
            continue
        learnable.append(ChoicesControl(
            name=control.name,
            to_names=tuple(dict.fromkeys(control.to_name)),
            choices=tuple(control.labels),
            multi_label=bool(control.is_multiple_choice),
        ))
    if not learnable:
        if ignored:
            found = "; ".join(f"<{i.tag} name=\"{i.name}\">: {i.reason}" for i in ignored)
            raise UnsupportedConfig(f"no control this backend can learn ({found}); {SUPPORTED}")
        raise UnsupportedConfig(f"found no <Choices> control; {SUPPORTED}")
    used = dict.fromkeys(name for control in learnable for name in control.to_names)
    return LabelConfig(
        controls=tuple(learnable),
        objects=tuple(TextObject(name=name, data_key=objects[name].value[1:], object_type=objects[name].tag)
                      for name in used),
        ignored=tuple(ignored),
    )

