"""A process serving the Prompts, Teacher and Trainer contracts with scripted work, and Storage's
DeletePrefix, for orchestrator tests.

The real stage services do not do their work yet; this stands in for them over real gRPC, built on the
same operation registry and server bootstrap they use. Each stage takes STAGE_SECONDS, reports progress,
and returns a well-formed result (with an SFT control when the spec lists one); the trainer's submit-time
check finds nothing. Every Start call is appended to the journal file as a JSON line ({"rpc",
"operation_id", "new"}), and every cancelled
operation as {"cancelled": operation_id}, so a test can prove that no work ran twice and that a cancel
reached the service; a DeletePrefix as {"rpc": "DeletePrefix", "prefix": prefix}.

    python scripted_stages.py PORT JOURNAL STAGE_SECONDS [FAIL_RPC]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from stillhouse.common.config import GrpcServiceSettings
from stillhouse.common.grpc_server import ServiceBinding, run_grpc_service
from stillhouse.common.operations import OperationError, OperationRegistry, ProgressReporter
from stillhouse.common.v1 import operations_pb2
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

# The steps of the training's whole curve in its result; its live progress reports ten items.
CURVE_STEPS = 40


class Journal:
    def __init__(self, path: Path) -> None:
        self._path = path

    def write(self, record: dict) -> None:
        with self._path.open("a") as journal:
            journal.write(json.dumps(record) + "\n")


def scripted_work(journal: Journal, operation_id: str, seconds: float, result, fail: bool):
    async def work(progress: ProgressReporter):
        steps = 10
        try:
            for done in range(1, steps + 1):
                await asyncio.sleep(seconds / steps)
                progress.update(
                    unit="items", done=done, total=steps, message=f"item {done}", metrics={"loss": 1 / done}
                )
        except asyncio.CancelledError:
            journal.write({"cancelled": operation_id})
            raise
        if fail:
            raise OperationError(grpc.StatusCode.FAILED_PRECONDITION, "scripted failure")
        return result

    return work


def build(registry: OperationRegistry, journal: Journal, seconds: float, fail_rpc: str | None):
    def start(rpc: str, request, result):
        known = True
        try:
            registry.get(request.operation_id)
        except LookupError:
            known = False
        journal.write({"rpc": rpc, "operation_id": request.operation_id, "new": not known})
        return registry.start(
            request.operation_id,
            kind=rpc,
            job_id=request.job_id,
            fingerprint=hashlib.sha256(request.SerializeToString(deterministic=True)).digest(),
            work=scripted_work(journal, request.operation_id, seconds, result, fail=rpc == fail_rpc),
        )

    dataset = operations_pb2.DatasetRef
    artifact = operations_pb2.ArtifactRef

    class Prompts(prompts_pb2_grpc.PromptsServicer):
        async def GeneratePrompts(self, request, context):
            result = prompts_pb2.GeneratePromptsResult(
                train=dataset(dataset_id=f"jobs/{request.job_id}/prompts/train", num_rows=90),
                holdout=dataset(dataset_id=f"jobs/{request.job_id}/prompts/holdout", num_rows=10),
                collected=100,
                removed_by_rule={"exact_duplicate": 3},
                generation_ledger=teacher_pb2.Ledger(requests=4, cached_requests=1, cost_usd=0.25),
            )
            return start("GeneratePrompts", request, result)

    class Teacher(teacher_pb2_grpc.TeacherServicer):
        async def AnswerPrompts(self, request, context):
            if not request.prompts.dataset_id.endswith("/prompts/train"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompts dataset not passed on")
            result = teacher_pb2.AnswerPromptsResult(
                answers=dataset(dataset_id=f"jobs/{request.job_id}/teacher/answers", num_rows=90),
                holdout_answers=dataset(dataset_id=f"jobs/{request.job_id}/teacher/holdout", num_rows=10),
            )
            return start("AnswerPrompts", request, result)

        async def EstimateCost(self, request, context):
            # Priced per row of the dataset given: 1 request, 20 prompt and 64 completion tokens, 1 cent.
            rows = 90 if request.prompts.dataset_id.endswith("/train") else 10
            journal.write({"rpc": "EstimateCost", "dataset_id": request.prompts.dataset_id})
            return teacher_pb2.CostEstimate(
                requests=rows, prompt_tokens=20 * rows, completion_tokens=64 * rows, cost_usd=0.01 * rows
            )

    class Trainer(trainer_pb2_grpc.TrainerServicer):
        async def CheckJob(self, request, context):
            journal.write({"rpc": "CheckJob"})
            return trainer_pb2.CheckJobResponse()

        async def TrainStudent(self, request, context):
            result = trainer_pb2.TrainStudentResult(
                student=artifact(artifact_id=f"jobs/{request.job_id}/train/student"),
                baseline=artifact(artifact_id=f"jobs/{request.job_id}/train/baseline"),
                steps=CURVE_STEPS,
                curve=[
                    trainer_pb2.TrainingCurvePoint(
                        model="student", step=step, metrics={"loss": 1 / step, "learning_rate": 1e-3}
                    )
                    for step in range(1, CURVE_STEPS + 1)
                ],
            )
            return start("TrainStudent", request, result)

        async def EvaluateStudent(self, request, context):
            if not request.student.artifact_id.endswith("/train/student"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "student artifact not passed on")
            if not request.training_answers.dataset_id.endswith("/teacher/answers"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "training answers not passed on")
            result = trainer_pb2.EvaluateStudentResult(
                recovery_percent=87.5,
                gap_closed_percent={"kl": 87.5, "top1_agreement": 60.0},
                unigram_metrics={"kl": 5.0, "top1_agreement": 0.06},
                uniform_metrics={"kl": 9.0},
                student_metrics={"kl": 0.625, "top1_agreement": 0.6},
                samples=[
                    trainer_pb2.AnswerSample(
                        prompt_id="p-1",
                        prompt="Why is the sky blue?",
                        teacher="Rayleigh.",
                        baseline="",
                        student="Light.",
                    )
                ],
            )
            if "sft" in json_format.MessageToDict(request.evaluation).get("controls", []):
                result.control_sft_metrics.update({"kl": 0.75, "top1_agreement": 0.55})
                result.control_sft_lead["kl"].CopyFrom(
                    trainer_pb2.PairedLead(difference=-0.125, low=-0.2, high=-0.05)
                )
                result.control_sft_lead["top1_agreement"].CopyFrom(
                    trainer_pb2.PairedLead(difference=0.05, low=-0.01, high=0.11)
                )
            return start("EvaluateStudent", request, result)

    class Storage(storage_pb2_grpc.StorageServicer):
        async def DeletePrefix(self, request, context):
            journal.write({"rpc": "DeletePrefix", "prefix": request.prefix})
            return storage_pb2.DeletePrefixResponse(deleted_objects=2)

    def service(module, name: str):
        return module.DESCRIPTOR.services_by_name[name].full_name

    prompts, teacher, trainer, storage = Prompts(), Teacher(), Trainer(), Storage()
    return [
        ServiceBinding(
            service(prompts_pb2, "Prompts"),
            lambda server: prompts_pb2_grpc.add_PromptsServicer_to_server(prompts, server),
        ),
        ServiceBinding(
            service(teacher_pb2, "Teacher"),
            lambda server: teacher_pb2_grpc.add_TeacherServicer_to_server(teacher, server),
        ),
        ServiceBinding(
            service(trainer_pb2, "Trainer"),
            lambda server: trainer_pb2_grpc.add_TrainerServicer_to_server(trainer, server),
        ),
        ServiceBinding(
            service(storage_pb2, "Storage"),
            lambda server: storage_pb2_grpc.add_StorageServicer_to_server(storage, server),
        ),
    ]


def main() -> None:
    port, journal_path, seconds = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    fail_rpc = sys.argv[4] if len(sys.argv) > 4 else None
    journal = Journal(journal_path)
    settings = GrpcServiceSettings(
        port=port,
        log_format="console",
        shutdown_grace_seconds=0.5,
        # The suite's service token (tests/conftest.py), which the control plane under test must send.
        service_token_file=Path(os.environ["STILLHOUSE_TEST_SERVICE_TOKEN_FILE"]),
    )
    run_grpc_service(
        "scripted-stages", settings, lambda registry: build(registry, journal, seconds, fail_rpc)
    )


if __name__ == "__main__":
    main()
