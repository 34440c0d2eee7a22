from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_MAX_CHARS: _ClassVar[StopReason]
    STOP_REASON_STOP_STRING: _ClassVar[StopReason]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_HIGH: Priority
PRIORITY_LOW: Priority
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_MAX_CHARS: StopReason
STOP_REASON_STOP_STRING: StopReason
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_UNAVAILABLE: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_UNLOADING: ModelState

class PredictRequest(_message.Message):
    __slots__ = ("texts", "top_k", "per_position", "return_state", "states", "model", "priority")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    per_position: bool
    return_state: bool
    states: _containers.RepeatedScalarFieldContainer[bytes]
    model: str
    priority: Priority
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., per_position: _Optional[bool] = ..., return_state: _Optional[bool] = ..., states: _Optional[_Iterable[bytes]] = ..., model: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class CharProb(_message.Message):
    __slots__ = ("char", "prob", "id")
    CHAR_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    char: str
    prob: float
    id: int
    def __init__(self, char: _Optional[str] = ..., prob: _Optional[float] = ..., id: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top", "argmax_text", "positions", "state")
    TOP_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_TEXT_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[CharProb]
    argmax_text: str
    positions: _containers.RepeatedCompositeFieldContainer[CharProb]
    state: bytes
    def __init__(self, top: _Optional[_Iterable[_Union[CharProb, _Mapping]]] = ..., argmax_text: _Optional[str] = ..., positions: _Optional[_Iterable[_Union[CharProb, _Mapping]]] = ..., state: _Optional[bytes] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_chars", "temperature", "top_k", "top_p", "seed", "stop", "state", "return_state", "model", "priority")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_chars: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    state: bytes
    return_state: bool
    model: str
    priority: Priority
    def __init__(self, prompt: _Optional[str] = ..., max_chars: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., state: _Optional[bytes] = ..., return_state: _Optional[bool] = ..., model: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "stop_reason", "state", "model_version", "model_name")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    text: str
    stop_reason: StopReason
    state: bytes
    model_version: str
    model_name: str
    def __init__(self, text: _Optional[str] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., state: _Optional[bytes] = ..., model_version: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model_version", "model_name", "artifact_sha256")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    model_name: str
    artifact_sha256: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., model_name: _Optional[str] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("cell", "vocab_size", "embed_dim", "hidden_size", "num_layers")
    CELL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    cell: str
    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_layers: int
    def __init__(self, cell: _Optional[str] = ..., vocab_size: _Optional[int] = ..., embed_dim: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_texts_per_request", "max_chars_per_text", "max_message_bytes", "max_top_k", "default_top_k", "max_queue_texts", "max_streams", "max_chars_per_request", "max_queue_chars", "low_max_queue_texts")
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_PER_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_CHARS_FIELD_NUMBER: _ClassVar[int]
    LOW_MAX_QUEUE_TEXTS_FIELD_NUMBER: _ClassVar[int]
    max_texts_per_request: int
    max_chars_per_text: int
    max_message_bytes: int
    max_top_k: int
    default_top_k: int
    max_queue_texts: int
    max_streams: int
    max_chars_per_request: int
    max_queue_chars: int
    low_max_queue_texts: int
    def __init__(self, max_texts_per_request: _Optional[int] = ..., max_chars_per_text: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_top_k: _Optional[int] = ..., default_top_k: _Optional[int] = ..., max_queue_texts: _Optional[int] = ..., max_streams: _Optional[int] = ..., max_chars_per_request: _Optional[int] = ..., max_queue_chars: _Optional[int] = ..., low_max_queue_texts: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("name", "version", "artifact_sha256", "vocab", "config", "backend", "device", "limits", "has_unknown_token", "server_version", "artifact_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    HAS_UNKNOWN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    artifact_sha256: str
    vocab: _containers.RepeatedScalarFieldContainer[str]
    config: ModelConfig
    backend: str
    device: str
    limits: ServerLimits
    has_unknown_token: bool
    server_version: str
    artifact_version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., vocab: _Optional[_Iterable[str]] = ..., config: _Optional[_Union[ModelConfig, _Mapping]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., has_unknown_token: _Optional[bool] = ..., server_version: _Optional[str] = ..., artifact_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "is_default", "artifact_version", "backend", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: ModelState
    reason: str
    is_default: bool
    artifact_version: str
    backend: str
    device: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., is_default: _Optional[bool] = ..., artifact_version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...
