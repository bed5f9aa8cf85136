from google.protobuf import struct_pb2 as _struct_pb2
from stillhouse.common.v1 import operations_pb2 as _operations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnswerPromptsRequest(_message.Message):
    __slots__ = ("operation_id", "job_id", "prompts", "teacher", "holdout", "tenant")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    job_id: str
    prompts: _operations_pb2.DatasetRef
    teacher: _struct_pb2.Struct
    holdout: _operations_pb2.DatasetRef
    tenant: str
    def __init__(self, operation_id: _Optional[str] = ..., job_id: _Optional[str] = ..., prompts: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., teacher: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., holdout: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class Ledger(_message.Message):
    __slots__ = ("requests", "cached_requests", "prompt_tokens", "completion_tokens", "cost_usd", "alternative_slots", "masked_alternatives", "top1_mismatches", "stop_tokens_added")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MASKED_ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    TOP1_MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKENS_ADDED_FIELD_NUMBER: _ClassVar[int]
    requests: int
    cached_requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    alternative_slots: int
    masked_alternatives: int
    top1_mismatches: int
    stop_tokens_added: int
    def __init__(self, requests: _Optional[int] = ..., cached_requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ..., alternative_slots: _Optional[int] = ..., masked_alternatives: _Optional[int] = ..., top1_mismatches: _Optional[int] = ..., stop_tokens_added: _Optional[int] = ...) -> None: ...

class AnswerPromptsResult(_message.Message):
    __slots__ = ("answers", "ledger", "failed_prompts", "stopped_reason", "holdout_answers")
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    FAILED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _operations_pb2.DatasetRef
    ledger: Ledger
    failed_prompts: int
    stopped_reason: str
    holdout_answers: _operations_pb2.DatasetRef
    def __init__(self, answers: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., ledger: _Optional[_Union[Ledger, _Mapping]] = ..., failed_prompts: _Optional[int] = ..., stopped_reason: _Optional[str] = ..., holdout_answers: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ...) -> None: ...

class EstimateCostRequest(_message.Message):
    __slots__ = ("prompts", "teacher")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    prompts: _operations_pb2.DatasetRef
    teacher: _struct_pb2.Struct
    def __init__(self, prompts: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., teacher: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CostEstimate(_message.Message):
    __slots__ = ("requests", "prompt_tokens", "completion_tokens", "cost_usd")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    def __init__(self, requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("job_id", "messages", "teacher", "tenant")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    teacher: _struct_pb2.Struct
    tenant: str
    def __init__(self, job_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., teacher: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "ledger")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: str
    ledger: Ledger
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., ledger: _Optional[_Union[Ledger, _Mapping]] = ...) -> None: ...
