from google.protobuf import struct_pb2 as _struct_pb2
from stillhouse.common.v1 import operations_pb2 as _operations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _struct_pb2.Struct
    def __init__(self, spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class SpecFinding(_message.Message):
    __slots__ = ("field", "message")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    field: str
    message: str
    def __init__(self, field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CheckJobResponse(_message.Message):
    __slots__ = ("violations", "warnings")
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    violations: _containers.RepeatedCompositeFieldContainer[SpecFinding]
    warnings: _containers.RepeatedCompositeFieldContainer[SpecFinding]
    def __init__(self, violations: _Optional[_Iterable[_Union[SpecFinding, _Mapping]]] = ..., warnings: _Optional[_Iterable[_Union[SpecFinding, _Mapping]]] = ...) -> None: ...

class TrainStudentRequest(_message.Message):
    __slots__ = ("operation_id", "job_id", "answers", "teacher", "student", "training", "evaluation")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    job_id: str
    answers: _operations_pb2.DatasetRef
    teacher: _struct_pb2.Struct
    student: _struct_pb2.Struct
    training: _struct_pb2.Struct
    evaluation: _struct_pb2.Struct
    def __init__(self, operation_id: _Optional[str] = ..., job_id: _Optional[str] = ..., answers: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., teacher: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., student: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., training: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., evaluation: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TrainStudentResult(_message.Message):
    __slots__ = ("student", "baseline", "steps", "tokens", "gpu_hours", "final_metrics", "sft_control", "curve")
    class FinalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GPU_HOURS_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    SFT_CONTROL_FIELD_NUMBER: _ClassVar[int]
    CURVE_FIELD_NUMBER: _ClassVar[int]
    student: _operations_pb2.ArtifactRef
    baseline: _operations_pb2.ArtifactRef
    steps: int
    tokens: int
    gpu_hours: float
    final_metrics: _containers.ScalarMap[str, float]
    sft_control: _operations_pb2.ArtifactRef
    curve: _containers.RepeatedCompositeFieldContainer[TrainingCurvePoint]
    def __init__(self, student: _Optional[_Union[_operations_pb2.ArtifactRef, _Mapping]] = ..., baseline: _Optional[_Union[_operations_pb2.ArtifactRef, _Mapping]] = ..., steps: _Optional[int] = ..., tokens: _Optional[int] = ..., gpu_hours: _Optional[float] = ..., final_metrics: _Optional[_Mapping[str, float]] = ..., sft_control: _Optional[_Union[_operations_pb2.ArtifactRef, _Mapping]] = ..., curve: _Optional[_Iterable[_Union[TrainingCurvePoint, _Mapping]]] = ...) -> None: ...

class TrainingCurvePoint(_message.Message):
    __slots__ = ("model", "step", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluateStudentRequest(_message.Message):
    __slots__ = ("operation_id", "job_id", "student", "baseline", "holdout_answers", "teacher", "evaluation", "training_answers")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    job_id: str
    student: _operations_pb2.ArtifactRef
    baseline: _operations_pb2.ArtifactRef
    holdout_answers: _operations_pb2.DatasetRef
    teacher: _struct_pb2.Struct
    evaluation: _struct_pb2.Struct
    training_answers: _operations_pb2.DatasetRef
    def __init__(self, operation_id: _Optional[str] = ..., job_id: _Optional[str] = ..., student: _Optional[_Union[_operations_pb2.ArtifactRef, _Mapping]] = ..., baseline: _Optional[_Union[_operations_pb2.ArtifactRef, _Mapping]] = ..., holdout_answers: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ..., teacher: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., evaluation: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., training_answers: _Optional[_Union[_operations_pb2.DatasetRef, _Mapping]] = ...) -> None: ...

class EvaluateStudentResult(_message.Message):
    __slots__ = ("report", "recovery_percent", "student_metrics", "baseline_metrics", "student", "teacher_metrics", "uniform_metrics", "unigram_metrics", "control_sft_metrics", "gap_closed_percent", "samples", "control_sft_lead")
    class StudentMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class BaselineMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TeacherMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class UniformMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class UnigramMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ControlSftMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class GapClosedPercentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ControlSftLeadEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PairedLead
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PairedLead, _Mapping]] = ...) -> None: ...
    REPORT_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STUDENT_METRICS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_METRICS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    TEACHER_METRICS_FIELD_NUMBER: _ClassVar[int]
    UNIFORM_METRICS_FIELD_NUMBER: _ClassVar[int]
    UNIGRAM_METRICS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SFT_METRICS_FIELD_NUMBER: _ClassVar[int]
    GAP_CLOSED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SFT_LEAD_FIELD_NUMBER: _ClassVar[int]
    report: _operations_pb2.ArtifactRef
    recovery_percent: float
    student_metrics: _containers.ScalarMap[str, float]
    baseline_metrics: _containers.ScalarMap[str, float]
    student: _operations_pb2.ArtifactRef
    teacher_metrics: _containers.ScalarMap[str, float]
    uniform_metrics: _containers.ScalarMap[str, float]
    unigram_metrics: _containers.ScalarMap[str, float]
    control_sft_metrics: _containers.ScalarMap[str, float]
    gap_closed_percent: _containers.ScalarMap[str, float]
    samples: _containers.RepeatedCompositeFieldContainer[AnswerSample]
    control_sft_lead: _containers.MessageMap[str, PairedLead]
    def __init__(self, report: _Optional[_Union[_operations_pb2.ArtifactRef, _Mapping]] = ..., recovery_percent: _Optional[float] = ..., student_metrics: _Optional[_Mapping[str, float]] = ..., baseline_metrics: _Optional[_Mapping[str, float]] = ..., student: _Optional[_Union[_operations_pb2.ArtifactRef, _Mapping]] = ..., teacher_metrics: _Optional[_Mapping[str, float]] = ..., uniform_metrics: _Optional[_Mapping[str, float]] = ..., unigram_metrics: _Optional[_Mapping[str, float]] = ..., control_sft_metrics: _Optional[_Mapping[str, float]] = ..., gap_closed_percent: _Optional[_Mapping[str, float]] = ..., samples: _Optional[_Iterable[_Union[AnswerSample, _Mapping]]] = ..., control_sft_lead: _Optional[_Mapping[str, PairedLead]] = ...) -> None: ...

class PairedLead(_message.Message):
    __slots__ = ("difference", "low", "high")
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    difference: float
    low: float
    high: float
    def __init__(self, difference: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class AnswerSample(_message.Message):
    __slots__ = ("prompt_id", "prompt", "teacher", "baseline", "student", "control_sft")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SFT_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    prompt: str
    teacher: str
    baseline: str
    student: str
    control_sft: str
    def __init__(self, prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ..., teacher: _Optional[str] = ..., baseline: _Optional[str] = ..., student: _Optional[str] = ..., control_sft: _Optional[str] = ...) -> None: ...
