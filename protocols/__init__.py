"""fleetflow wire protocol v1: signed CBOR (COSE_Sign1, Ed25519) over MQTT. Pure: no sockets, no clock reads.

    signer = Signer(signing_key, fleet="plant1", sender="pump-7", boot=3)
    out = signer.seal(Heartbeat(running=1, free=3), now_ms)        # -> Outgoing(topic, payload, header)
    receiver = Receiver(fleet="plant1", keyring=Keyring([("pump-7", public_key)]))
    message = receiver.receive(out.topic, out.payload, now_ms)      # -> Message(header, body) or a ProtocolError

docs/protocol.md is the normative spec.
"""

from .envelope import DEFAULT_MAX_SIZE, kid_for
from .errors import (REASONS, BadSignature, Expired, FleetflowError, LocalProtocolError, Malformed, ProtocolError,
                     RemoteProtocolError, Replayed, TooLarge, UnknownKey, WrongSender, WrongTarget, WrongTopic)
from .messages import (BODY_TYPES, ENROLL_VERDICTS, PROTOCOL_VERSION, STEP_EVENTS, Ack, Assign, AttemptRef, Birth,
                       Body, Cancel, Config, Death, Drain, Enroll, Header, Heartbeat, HubState, Message, StepEvent,
                       StepResult, Telemetry, body_from_map, body_to_map)
from .replay import ReplayWindow
from .signing import HUB_ID, Keyring, Outgoing, Receiver, Signer, open_envelope
from .topics import Topic, TopicFilter, check_id, is_valid_id

__all__ = [
    "DEFAULT_MAX_SIZE", "kid_for",
    "REASONS", "BadSignature", "Expired", "FleetflowError", "LocalProtocolError", "Malformed", "ProtocolError",
    "RemoteProtocolError",
    "Replayed", "TooLarge", "UnknownKey", "WrongSender", "WrongTarget", "WrongTopic",
    "BODY_TYPES", "ENROLL_VERDICTS", "PROTOCOL_VERSION", "STEP_EVENTS", "Ack", "Assign", "AttemptRef", "Birth", "Body",
    "Cancel", "Config", "Death", "Drain", "Enroll", "Header", "Heartbeat", "HubState", "Message", "StepEvent",
    "StepResult", "Telemetry", "body_from_map", "body_to_map",
    "ReplayWindow",
    "HUB_ID", "Keyring", "Outgoing", "Receiver", "Signer", "open_envelope",
    "Topic", "TopicFilter", "check_id", "is_valid_id",
]
