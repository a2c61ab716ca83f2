#!/usr/bin/env bash
# Captures a real session with the service for docs/examples/serve-session.txt: the quickstart checkpoint, a
# throwaway Redis on port 6391, `python -m serve run serve.config.yaml`, then the requests below.
#   bash docs/examples/capture_serve_session.sh > docs/examples/serve-session.txt
set -u
cd "$(dirname "$0")/../.."
PORT=6391
redis-server --port $PORT --save "" --appendonly no --daemonize yes --logfile /tmp/redis-capture.log
export NEZHA_REDIS_URL=redis://127.0.0.1:$PORT/0 NEZHA_ADMIN_TOKEN=demo-token
.venv/bin/nezha catalog push --checkpoint runs/quickstart/train/best 2>&1 | tail -1
.venv/bin/ray stop --force >/dev/null 2>&1
.venv/bin/python -m serve run serve.config.yaml > /tmp/serve_capture.log 2>&1 &
for i in $(seq 1 90); do curl -sf http://127.0.0.1:8000/readyz >/dev/null && break; sleep 2; done
echo '$ curl -s localhost:8000/v1/recommend -H "Content-Type: application/json" -d @- <<< '"'"'{"history": ["B0000632EN", "B003A870SE", "B003A8EKTG", "B005QPBBO8"], "k": 3, "exclude_history": true}'"'"
curl -s localhost:8000/v1/recommend -H "Content-Type: application/json" -d '{"history": ["B0000632EN", "B003A870SE", "B003A8EKTG", "B005QPBBO8"], "k": 3, "exclude_history": true}' | python3 -m json.tool
echo '$ curl -s localhost:8000/v1/recommend/batch ... (2 users, one with an unknown item)'
curl -s localhost:8000/v1/recommend/batch -H "Content-Type: application/json" -d '{"requests": [{"history": ["B000HVD5ZE", "B004M2Y7RY", "B000MVVK7E"], "k": 2}, {"history": ["NOT-AN-ITEM"], "k": 2}]}' | python3 -m json.tool
echo '$ curl -s localhost:8000/v1/items/B0000632EN'
curl -s localhost:8000/v1/items/B0000632EN | python3 -m json.tool
echo '$ curl -s -X POST localhost:8000/v1/catalog/items -H "Authorization: Bearer $NEZHA_ADMIN_TOKEN" ... (by text)'
curl -s -X POST localhost:8000/v1/catalog/items -H "Authorization: Bearer demo-token" -H "Content-Type: application/json" -d '{"items": [{"item_id": "NEW-SERUM-1", "text": "Vitamin C brightening face serum with hyaluronic acid", "title": "Glow Vitamin C Serum", "brand": "Glow", "categories": ["Beauty", "Skin Care", "Face", "Serums"]}]}' | python3 -m json.tool
echo '$ curl -s localhost:8000/v1/items/NEW-SERUM-1'
curl -s localhost:8000/v1/items/NEW-SERUM-1 | python3 -m json.tool
kill -INT %1 2>/dev/null; sleep 5; .venv/bin/ray stop --force >/dev/null 2>&1
redis-cli -p $PORT shutdown nosave >/dev/null 2>&1
