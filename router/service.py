"""RouterService: thin servicers that shape the pipeline's events into router.v1 messages."""
from __future__ import annotations

from core.errors import FailedPrecondition, InvalidArgument
from router.grpc_errors import maps_errors
from router.pipeline import Chunk, Finished, Pipeline, Started, last_user_text, new_request_id
from router.request_checks import check_messages, check_name, check_text
from router.routing import Decision, decide
from router.v1 import router_pb2 as pb
from router.v1 import router_pb2_grpc as pbg

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_CANCELLED,
          "cancelled": pb.FINISH_REASON_CANCELLED, "error": pb.FINISH_REASON_ERROR}


def route_pb(d: Decision) -> pb.Route:
    return pb.Route(task=d.task, confidence=d.confidence, reason=d.reason)


def _usage(f: Finished) -> pb.Usage:
    return pb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                    total_tokens=f.prompt_tokens + f.completion_tokens)


def _timings(f: Finished) -> pb.Timings:
    t = f.timings
    return pb.Timings(classify_ms=t.classify_ms, ttft_ms=t.ttft_ms, total_ms=t.total_ms, backend_ms=t.backend_ms)


def _start(context) -> str:
    rid = new_request_id()
    context.set_trailing_metadata((("x-request-id", rid),))
    return rid


class RouterServicer(pbg.RouterServiceServicer):
    def __init__(self, pipeline: Pipeline, log_writer=None):
        self.pipeline = pipeline
        self.log_writer = log_writer

    @maps_errors
    async def Generate(self, request, context):
        rid = _start(context)
        final: Finished | None = None
        async for ev in self.pipeline.run(request, stream=False, time_remaining=context.time_remaining(),
                                          request_id=rid):
            if isinstance(ev, Finished):
                final = ev
        assert final is not None  # the pipeline ends with Finished or raises
        return pb.GenerateResponse(
            request_id=final.request_id, text=final.text, reasoning_text=final.reasoning_text,
            adapter=final.decision.adapter, finish_reason=FINISH.get(final.finish_reason, pb.FINISH_REASON_STOP),
            usage=_usage(final), timings=_timings(final), route=route_pb(final.decision),
            model=self.pipeline.served_model)

    @maps_errors
    async def GenerateStream(self, request, context):
        rid = _start(context)
        first = True
        model = self.pipeline.served_model
        async for ev in self.pipeline.run(request, stream=True, time_remaining=context.time_remaining(),
                                          request_id=rid):
            if isinstance(ev, Started):
                decision = ev.decision
            elif isinstance(ev, Chunk):
                msg = pb.GenerateStreamResponse(request_id=rid, delta=ev.delta, reasoning_delta=ev.reasoning_delta)
                if first:  # the first message says where the request went
                    msg.adapter, msg.model = decision.adapter, model
                    msg.route.CopyFrom(route_pb(decision))
                    first = False
                yield msg
            else:
                yield pb.GenerateStreamResponse(
                    request_id=rid, finished=True, adapter=ev.decision.adapter, route=route_pb(ev.decision),
                    model=model, finish_reason=FINISH.get(ev.finish_reason, pb.FINISH_REASON_STOP),
                    usage=_usage(ev), timings=_timings(ev))

    @maps_errors
    async def Classify(self, request, context):
        limits = self.pipeline.cfg.limits
        text = check_text("text", request.text, limits.max_message_chars, "max_message_chars") or \
            last_user_text(check_messages(request.messages, limits) if request.messages else [])
        if not text.strip():
            raise InvalidArgument("text is empty: send the prompt to classify in `text` or `messages`")
        clf = self.pipeline.classifier
        if not clf.enabled:
            raise FailedPrecondition("no classifier is configured on this gateway (classifier.enabled=false)")
        pred = await clf.predict(text)
        d = decide(self.pipeline.table, task_override="", known_tasks=clf.tasks, prediction=pred,
                   threshold=clf.threshold())
        return pb.ClassifyResponse(route=route_pb(d), adapter=d.adapter, threshold=clf.threshold(),
                                   truncated=d.truncated,
                                   scores=[pb.TaskScore(task=t, probability=p) for t, p in
                                           sorted(d.scores.items(), key=lambda kv: -kv[1])])

    @maps_errors
    async def SubmitFeedback(self, request, context):
        fb, created = await submit_feedback(self.pipeline, self.log_writer, request)
        return pb.SubmitFeedbackResponse(feedback_id=fb.feedback_id, created=created)


async def submit_feedback(pipeline: Pipeline, log_writer, request: pb.SubmitFeedbackRequest):
    """(Feedback, created) for a checked feedback request: shared by gRPC and HTTP."""
    limits = pipeline.cfg.limits
    if not request.request_id:
        raise InvalidArgument("request_id is empty: pass the request_id returned by Generate")
    check_name("request_id", request.request_id, limits)
    check_text("correction", request.correction, limits.max_feedback_chars, "max_feedback_chars")
    check_text("comment", request.comment, limits.max_comment_chars, "max_comment_chars")
    if not 1 <= request.rating <= 5:
        raise InvalidArgument(f"rating is {request.rating}: use 1 (bad) to 5 (excellent)")
    if log_writer is None:
        raise FailedPrecondition("logging is disabled on this gateway (logs.enabled=false): feedback has nowhere "
                                 "to go")
    return await log_writer.add_feedback(request.request_id, request.rating, request.correction, request.comment)
