"""The options a message travels with: the matching rule's, else the user's, else the global ones."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import Config, MessageOptions, Tracking


@dataclass(frozen=True)
class Options:
    sender_mode: str
    from_local: str
    ad_marker: str | None
    label: int | None
    tracking: Tracking



def resolve_options(config: Config, rule: MessageOptions | None, user: MessageOptions) -> Options:
    layers = [layer for layer in (rule, user) if layer is not None]

    def first(get):
        return next((value for value in map(get, layers) if value is not None), None)

    tracking = {
        key: first(lambda layer, key=key: getattr(layer.tracking, key) if layer.tracking else None)
        for key in Tracking.model_fields
    }
    mode = first(lambda layer: layer.sender.mode if layer.sender else None)
    from_local = first(lambda layer: layer.sender.from_local if layer.sender else None)
    return Options(
        sender_mode=mode or config.sender.mode,
        from_local=from_local or config.sender.from_local,
        ad_marker=first(lambda layer: layer.ad_marker),
        label=first(lambda layer: layer.label),
        tracking=Tracking(**tracking),
    )
