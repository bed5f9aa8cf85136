from google.protobuf import struct_pb2 as _struct_pb2
from stillhouse.common.v1 import operations_pb2 as _operations_pb2
from stillhouse.teacher.v1 import teacher_pb2 as _teacher_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GeneratePromptsRequest(_message.Message):
    __slots__ = ("operation_id", "job_id", "prompts", "teacher", "evaluation", "tenant")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    job_id: str
    prompts: _struct_pb2.Struct
    teacher: _struct_pb2.Struct
    evaluation: _struct_pb2.Struct
    tenant: str
    def __init__(self, operation_id: _Optional[str] = ..., job_id: _Optional[str] = ..., prompts: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., teacher: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., evaluation: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class GeneratePromptsResult(_message.Message):
    __slots__ = ("train", "holdout", "collected", "removed_by_rule", "generation_ledger", "shortfall", "warnings")
    class RemovedByRuleEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    COLLECTED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_BY_RULE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_LEDGER_FIELD_NUMBER: _ClassVar[int]
    SHORTFALL_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    train: _operations_pb2.DatasetRef
    holdout: _operations_pb2.DatasetRef
    collected: int
    removed_by_rule: _containers.ScalarMap[str, int]
    generation_ledger: _teacher_pb2.Ledger
    shortfall: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, train: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., holdout: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., collected: _Optional[int] = ..., removed_by_rule: _Optional[_Mapping[str, int]] = ..., generation_ledger: _Optional[_Union[_teacher_pb2.Ledger, _Mapping]] = ..., shortfall: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
