"""The loop controller: retrain specialists from the service's own traffic, canary them on live traffic, and
promote or roll back with no person in the loop (`specialist-router loop`; docs/loop.md).

It reads the log store and the registry only (never a gateway's memory), so it runs beside any number of
gateways: the canary state it writes into the registry is what every gateway replica applies.
"""
