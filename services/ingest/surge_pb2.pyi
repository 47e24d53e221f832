from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestRequest(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: Header
    chunk: Chunk
    end: End
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("study_id", "simulation_id", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    simulation_id: int
    params: _containers.ScalarMap[str, float]
    def __init__(self, study_id: _Optional[str] = ..., simulation_id: _Optional[int] = ..., params: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("time_index", "field", "dtype", "shape", "data")
    TIME_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    time_index: int
    field: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, time_index: _Optional[int] = ..., field: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Ack(_message.Message):
    __slots__ = ("credit_bytes", "accepted_samples", "message")
    CREDIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    credit_bytes: int
    accepted_samples: int
    message: str
    def __init__(self, credit_bytes: _Optional[int] = ..., accepted_samples: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class NextSimulationRequest(_message.Message):
    __slots__ = ("study_id",)
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    def __init__(self, study_id: _Optional[str] = ...) -> None: ...

class FieldSteps(_message.Message):
    __slots__ = ("field", "time_indices")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    TIME_INDICES_FIELD_NUMBER: _ClassVar[int]
    field: str
    time_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, field: _Optional[str] = ..., time_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class Simulation(_message.Message):
    __slots__ = ("study_id", "simulation_id", "params", "param_names", "seed", "solver", "solver_config_json", "fields", "grid", "times", "send", "attempt")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PARAM_NAMES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SOLVER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    SEND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    simulation_id: int
    params: _containers.ScalarMap[str, float]
    param_names: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    solver: str
    solver_config_json: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    grid: _containers.RepeatedScalarFieldContainer[int]
    times: _containers.RepeatedScalarFieldContainer[float]
    send: _containers.RepeatedCompositeFieldContainer[FieldSteps]
    attempt: int
    def __init__(self, study_id: _Optional[str] = ..., simulation_id: _Optional[int] = ..., params: _Optional[_Mapping[str, float]] = ..., param_names: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., solver: _Optional[str] = ..., solver_config_json: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ..., grid: _Optional[_Iterable[int]] = ..., times: _Optional[_Iterable[float]] = ..., send: _Optional[_Iterable[_Union[FieldSteps, _Mapping]]] = ..., attempt: _Optional[int] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("study_id", "simulation_id", "reason")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    simulation_id: int
    reason: str
    def __init__(self, study_id: _Optional[str] = ..., simulation_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ("requeued",)
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    requeued: bool
    def __init__(self, requeued: _Optional[bool] = ...) -> None: ...

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "params", "times", "inputs")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Array
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    params: _containers.ScalarMap[str, float]
    times: _containers.RepeatedScalarFieldContainer[float]
    inputs: _containers.MessageMap[str, Array]
    def __init__(self, model: _Optional[str] = ..., params: _Optional[_Mapping[str, float]] = ..., times: _Optional[_Iterable[float]] = ..., inputs: _Optional[_Mapping[str, Array]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "shape", "data", "std", "ensemble")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    std: bytes
    ensemble: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., std: _Optional[bytes] = ..., ensemble: _Optional[int] = ...) -> None: ...
