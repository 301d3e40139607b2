"""Strict checks against the openai SDK's own models (the SDK itself builds its objects leniently)."""

from __future__ import annotations

from typing import get_args

from openai.types.responses import Response, ResponseStreamEvent

# type -> the SDK's model of that event (its union is not discriminated: pick by type, then validate strictly)
EVENT_MODELS = {get_args(cls.model_fields["type"].annotation)[0]: cls
                for cls in get_args(get_args(ResponseStreamEvent)[0])}


def validated(response) -> Response:
    return Response.model_validate(response.to_dict() if hasattr(response, "to_dict") else response)


def stream_events(client, **kwargs) -> list:
    """A streamed response's events, each validated; their sequence numbers are 0, 1, 2, ..."""
    events = [EVENT_MODELS[ev.type].model_validate(ev.to_dict())
              for ev in client.responses.create(stream=True, **kwargs)]
    assert [ev.sequence_number for ev in events] == list(range(len(events)))
    return events
