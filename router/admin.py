"""AdminService: adapters (list, load, unload, deploy, rollback, retire) and the classifier (reload)."""
from __future__ import annotations

import re

from core.errors import FailedPrecondition, InvalidArgument, quoted
from router.classify import TaskClassifier
from router.deploy import Deployer
from router.grpc_errors import maps_errors
from router.lora import AdapterLoader, AdapterPolicy
from router.replicas import ReplicaSet
from router.routing import LoadedAdapter, RoutingTable
from router.v1 import router_pb2 as pb
from router.v1 import router_pb2_grpc as pbg

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")


def adapter_info(a: LoadedAdapter, table: RoutingTable, backend: ReplicaSet) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=a.name, path=a.path, task=a.task, version=a.version,
                          routed=a.name in table.routes.values(), in_flight=a.in_flight, replicas=backend.holders(a.name))


class AdminServicer(pbg.AdminServiceServicer):
    def __init__(self, loader: AdapterLoader, policy: AdapterPolicy, deployer: Deployer | None,
                 classifier: TaskClassifier):
        self.loader = loader
        self.policy = policy
        self.table = loader.table
        self.deployer_ = deployer
        self.classifier = classifier

    def _deployer(self) -> Deployer:
        if self.deployer_ is None:
            raise FailedPrecondition("this gateway has no adapter registry configured")
        return self.deployer_

    @maps_errors
    async def ListAdapters(self, request, context):
        t, b = self.table, self.loader.backend
        return pb.ListAdaptersResponse(adapters=[adapter_info(a, t, b) for a in t.loaded.values()],
                                       routes=[pb.RouteEntry(task=k, adapter=v) for k, v in sorted(t.routes.items())],
                                       replicas=[pb.ReplicaInfo(**r.describe()) for r in b.replicas])

    @maps_errors
    async def LoadAdapter(self, request, context):
        if not request.name or not request.path:
            raise InvalidArgument("name and path are required: LoadAdapter(name='code@1', path='/abs/peft/folder')")
        if not ADAPTER_NAME.match(request.name) or request.name == "base":
            raise InvalidArgument(f"adapter name {quoted(request.name)} is not allowed: use letters, digits, '_', "
                                  "'-', '.', '@' (max 100 characters), not 'base'")
        self.policy.check_path(request.path)  # before anything looks at the folder
        await self.policy.validate(request.path)  # the same checks as a deploy
        a = await self.loader.load(request.name, request.path)
        return pb.LoadAdapterResponse(adapter=adapter_info(a, self.table, self.loader.backend))

    @maps_errors
    async def UnloadAdapter(self, request, context):
        await self.loader.unload(request.name)
        return pb.UnloadAdapterResponse()

    @maps_errors
    async def DeployAdapter(self, request, context):
        return pb.DeployAdapterResponse(**await self._deployer().deploy(request.task, request.version or None))

    @maps_errors
    async def RollbackAdapter(self, request, context):
        return pb.RollbackAdapterResponse(**await self._deployer().rollback(request.task))

    @maps_errors
    async def RetireAdapter(self, request, context):
        return pb.RetireAdapterResponse(**await self._deployer().retire(request.task))

    @maps_errors
    async def ReloadClassifier(self, request, context):
        clf = await self.classifier.reload(request.path or None)
        return pb.ReloadClassifierResponse(version=str(clf.version), tasks=list(clf.tasks))
