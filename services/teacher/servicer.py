"""The Teacher gRPC service: translates requests into teacher-stage runs, estimates and single calls."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from google.protobuf import message

from stillhouse.common.datasets.store import DatasetNotFound, DatasetReader
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.grpc_server import abort_for
from stillhouse.common.jobspec import TeacherBackend, TeacherSpec
from stillhouse.common.objectstore.objects import ObjectStore, ObjectStoreError
from stillhouse.common.operations import (
    OperationConflict,
    OperationError,
    OperationRegistry,
)
from stillhouse.common.spec_sections import spec_section
from stillhouse.teacher import call_metrics
from stillhouse.teacher.cache import TeacherCache
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherCallError
from stillhouse.teacher.estimate import estimate_cost, prompt_tokens
from stillhouse.teacher.ledger import Ledger, PriceTable
from stillhouse.teacher.shards import ShardAnswerer, call_for
from stillhouse.teacher.stage import AnswerPromptsStage
from stillhouse.teacher.teachers import TeacherPool
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

ANSWER_PROMPTS = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].methods_by_name["AnswerPrompts"].full_name


def teacher_spec(struct: message.Message) -> TeacherSpec:
    return spec_section(TeacherSpec, struct, "spec.teacher")


@dataclass
class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    registry: OperationRegistry
    store: ObjectStore
    cache: TeacherCache
    teachers: TeacherPool
    prices: PriceTable
    fanout: FanoutSettings = field(default_factory=FanoutSettings)

    def _checked_price(self, spec: TeacherSpec):
        if (
            spec.budget_usd is not None
            and spec.backend is TeacherBackend.OPENAI
            and not self.prices.has_price(spec.model)
        ):
            raise OperationError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no price for model {spec.model!r} in the price table, so budgetUSD cannot be enforced: "
                "add the model to the table or drop the budget",
            )
        return self.prices.price(spec.model)

    async def AnswerPrompts(self, request, context):
        try:
            spec = teacher_spec(request.teacher)
            if not request.prompts.dataset_id:
                raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, "prompts.dataset_id must be set")
            self._checked_price(spec)  # a budget needs the model's price, checked before the stage starts

            async def work(progress):
                # The teacher is made here first: a refused address or a missing key fails the stage at once.
                await self.teachers.get(spec)
                stage = AnswerPromptsStage(
                    store=self.store,
                    spec=spec,
                    job_id=request.job_id,
                    scope=self.teachers.cache_scope(spec, request.tenant),
                    fanout=self.fanout,
                    progress=progress,
                )
                try:
                    return await stage.run(
                        request.operation_id,
                        request.prompts.dataset_id,
                        request.holdout.dataset_id,
                        local_shards=ShardAnswerer(self.store, self.cache, self.teachers, self.prices),
                    )
                except DatasetNotFound as exc:
                    raise OperationError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
                except ObjectStoreError as exc:
                    raise OperationError(grpc.StatusCode.UNAVAILABLE, f"object storage: {exc}") from exc

            return self.registry.start_request(request, kind=ANSWER_PROMPTS, work=work)
        except (OperationError, OperationConflict) as exc:
            await abort_for(context, exc)

    async def EstimateCost(self, request, context):
        try:
            spec = teacher_spec(request.teacher)
            price = self._checked_price(spec)

            def read_prompts() -> list[list[ChatMessage]]:
                table = DatasetReader(self.store, request.prompts.dataset_id).read_table(columns=["messages"])
                return [
                    [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
                    for messages in table.column("messages").to_pylist()
                ]

            prompts = await asyncio.to_thread(read_prompts)
        except DatasetNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except OperationError as exc:
            await abort_for(context, exc)
        return estimate_cost(prompts, max_tokens=spec.sampling.max_tokens, price=price).to_proto()

    async def Complete(self, request, context):
        try:
            spec = teacher_spec(request.teacher)
            price = self.prices.price(spec.model)
            teacher = await self.teachers.get(spec)
            scope = self.teachers.cache_scope(spec, request.tenant)
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            call = call_for(spec, messages, scope=scope)
            cached = (await self.cache.get_many([call.cache_key()])).get(call.cache_key())
            answer = cached or await teacher.answer(call, prompt_tokens(call.messages) + call.max_tokens)
            if cached is None:
                await self.cache.put_many([(call, answer)])
        except OperationError as exc:
            await abort_for(context, exc)
        except TeacherCallError as exc:
            call_metrics.failed(spec, exc.kind)
            code = grpc.StatusCode.UNAVAILABLE if exc.retryable else grpc.StatusCode.FAILED_PRECONDITION
            if exc.kind is FailureKind.EGRESS_REFUSED:
                code = grpc.StatusCode.PERMISSION_DENIED
            await context.abort(code, f"the teacher {spec.model!r}: {exc}")
        ledger = Ledger()
        ledger.record(answer, price, cached=cached is not None)
        call_metrics.answered(spec, answer, price, cached=cached is not None)
        return teacher_pb2.CompleteResponse(
            text=answer.text, finish_reason=answer.finish_reason, ledger=ledger.to_proto()
        )
