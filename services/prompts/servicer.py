"""The Prompts gRPC service: validates a GeneratePrompts request and runs the stage as an operation."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format

from stillhouse.common.datasets.manifest import validate_dataset_id
from stillhouse.common.grpc_server import abort_for
from stillhouse.common.input_roots import InputRefused, InputRoots, check_prompt_inputs
from stillhouse.common.jobspec import EvaluationSpec, PromptsSpec, TeacherSpec
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.operations import (
    OperationConflict,
    OperationError,
    OperationRegistry,
)
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.common.spec_sections import spec_section
from stillhouse.prompts.config import PromptsSettings
from stillhouse.prompts.shards import ShardResources, teacher_completers
from stillhouse.prompts.stage import TEACHER_STRATEGIES, GeneratePromptsRun, refuse_unworkable
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

GENERATE_PROMPTS = (
    prompts_pb2.DESCRIPTOR.services_by_name["Prompts"].methods_by_name["GeneratePrompts"].full_name
)


@dataclass
class PromptsServicer(prompts_pb2_grpc.PromptsServicer):
    registry: OperationRegistry
    store: ObjectStore
    settings: PromptsSettings
    credentials: ServiceCredentials
    _input_roots: InputRoots = field(init=False)
    _resources: ShardResources = field(init=False)

    def __post_init__(self) -> None:
        self._input_roots = InputRoots.of(self.settings.input_roots)
        self._resources = ShardResources(
            store=self.store,
            input_roots=self._input_roots,
            open_completer=teacher_completers(
                self.settings.teacher_address, self.credentials, self.settings.teacher_timeout_seconds
            ),
        )

    async def GeneratePrompts(self, request, context):
        try:
            try:
                validate_dataset_id(f"jobs/{request.job_id}/prompts/train")
            except ValueError as exc:
                problem = f"job_id {request.job_id!r} cannot name a dataset: {exc}"
                raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, problem) from exc
            spec = spec_section(PromptsSpec, request.prompts, "spec.prompts")
            evaluation = spec_section(EvaluationSpec, request.evaluation, "spec.evaluation")
            teacher = None
            needs_teacher = spec.generate.strategy in TEACHER_STRATEGIES
            refuse_unworkable(spec, has_teacher=bool(request.teacher.fields))
            try:
                check_prompt_inputs(spec, self._input_roots)
            except InputRefused as refused:
                raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, str(refused)) from None
            if needs_teacher:
                spec_section(TeacherSpec, request.teacher, "spec.teacher")
                teacher = json_format.MessageToDict(request.teacher)

            async def work(progress):
                run = GeneratePromptsRun(
                    resources=self._resources,
                    spec=spec,
                    holdout_fraction=evaluation.holdout_fraction,
                    job_id=request.job_id,
                    progress=progress,
                    operation_id=request.operation_id,
                    tenant=request.tenant,
                    teacher=teacher,
                    fanout=self.settings.fanout,
                    concurrency=self.settings.generation_concurrency,
                    patience=self.settings.generation_patience,
                )
                return await run.run()

            return self.registry.start_request(request, kind=GENERATE_PROMPTS, work=work)
        except (OperationError, OperationConflict) as exc:
            await abort_for(context, exc)
