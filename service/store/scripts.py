"""The job queue's compound operations, each one Lua script so it is atomic and safe to retry.

Invariant kept by these scripts: `<p>:work` holds the row-steps (service/store/capacity.py) of
every job entry in the stream, i.e. of every job waiting or running. `admit` adds an
entry and its cost, `end` removes them, `release` moves an entry without changing the
sum, and `reconcile` recomputes the sum from the stream (after a deleted or trimmed
stream). Each script can run twice without harm: a job id already present, an entry
already deleted, a job already released are recognised, so clients retry them after a
lost connection like any idempotent command.

Single flight: while a job for a content key is queued or running, `<p>:inflight:<key>`
names it; an identical request on any API replica becomes its follower (a job hash with
`follows`, and an entry in `<p>:followers:<leader id>`), and `end` gives every follower
the leader's outcome and wake-up (its reply channel, and the events channel that the
Server-Sent Events relay reads).
"""

from __future__ import annotations

import json

ADMIT = """
-- KEYS: stream, job hash, work, inflight, result
-- ARGV: job id, max queue length, work limit (-1: none), alone fits (1/0), ttl s, inflight ttl ms,
--       stream maxlen, cost, job hash fields (json), stream fields (json), reply_to, key prefix
local stream, job, work, inflight, result = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, prefix = ARGV[1], ARGV[12]
local function flat(json)
  local out = {}
  for k, v in pairs(cjson.decode(json)) do out[#out + 1] = k; out[#out + 1] = tostring(v) end
  return out
end
if redis.call('EXISTS', job) == 1 then return {'exists'} end
if redis.call('EXISTS', result) == 1 then return {'cached'} end
local leader = redis.call('GET', inflight)
if leader and redis.call('EXISTS', prefix .. ':job:' .. leader) == 1 then
  redis.call('HSET', job, 'follows', leader, unpack(flat(ARGV[9])))
  redis.call('EXPIRE', job, ARGV[5])
  local followers = prefix .. ':followers:' .. leader
  redis.call('RPUSH', followers, id .. ' ' .. ARGV[11])
  redis.call('PEXPIRE', followers, ARGV[6])
  return {'follow', leader}
end
local depth = redis.call('XLEN', stream)
if depth == 0 then redis.call('SET', work, 0) end
local ahead = tonumber(redis.call('GET', work) or '0')
if depth >= tonumber(ARGV[2]) then return {'full', depth, tostring(ahead)} end
if tonumber(ARGV[3]) >= 0 then
  if ARGV[4] ~= '1' then return {'too_long', depth, tostring(ahead)} end
  if depth > 0 and ahead > tonumber(ARGV[3]) then return {'busy', depth, tostring(ahead)} end
end
redis.call('HSET', job, unpack(flat(ARGV[9])))
redis.call('EXPIRE', job, ARGV[5])
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[7], '*', unpack(flat(ARGV[10])))
redis.call('INCRBY', work, ARGV[8])
redis.call('SET', inflight, id, 'PX', ARGV[6])
return {'queued', depth + 1, tostring(ahead + tonumber(ARGV[8]))}
"""

END = """
-- KEYS: job hash, stream, work, inflight, result ('' : none)
-- ARGV: stream id, group, ttl s, job id, reply_to, key prefix, status fields (json), events channel,
--       png ('' : none), result meta (json)
-- The PNG arrives once, stored under the result key and sent whole to each waiting API process
-- (reply: "<job id>\\n<status json>\\n<png>"), so the API answers without reading it back.
local job, stream, work, inflight, result = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local sid, id, prefix, png = ARGV[1], ARGV[4], ARGV[6], ARGV[9]
local status = {}
for k, v in pairs(cjson.decode(ARGV[7])) do status[#status + 1] = k; status[#status + 1] = tostring(v) end
if result ~= '' and png ~= '' then
  redis.call('HSET', result, 'png', png, 'meta', ARGV[10])
  redis.call('EXPIRE', result, ARGV[3])
end
redis.call('HSET', job, unpack(status))
redis.call('EXPIRE', job, ARGV[3])
if sid ~= '' then
  redis.call('XACK', stream, ARGV[2], sid)
  local entry = redis.call('XRANGE', stream, sid, sid)
  if #entry > 0 and redis.call('XDEL', stream, sid) == 1 then
    local fields, cost = entry[1][2], 0
    for i = 1, #fields, 2 do if fields[i] == 'cost' then cost = tonumber(fields[i + 1]) or 0 end end
    if redis.call('DECRBY', work, cost) < 0 then redis.call('SET', work, 0) end
  end
end
if redis.call('GET', inflight) == id then redis.call('DEL', inflight) end
local tail = '\\n' .. ARGV[7] .. '\\n' .. png
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], id .. tail) end
local ended = {[id] = cjson.decode(ARGV[7])['status']}
local followers = prefix .. ':followers:' .. id
for _, item in ipairs(redis.call('LRANGE', followers, 0, -1)) do
  local sep = string.find(item, ' ', 1, true)
  local fid, reply = string.sub(item, 1, sep - 1), string.sub(item, sep + 1)
  redis.call('HSET', prefix .. ':job:' .. fid, unpack(status))
  redis.call('EXPIRE', prefix .. ':job:' .. fid, ARGV[3])
  if reply ~= '' then redis.call('PUBLISH', reply, fid .. tail) end
  ended[fid] = ended[id]
end
redis.call('DEL', followers)
redis.call('PUBLISH', ARGV[8], cjson.encode({['end'] = ended}))
return 1
"""

RELEASE = """
-- KEYS: job hash, stream, work
-- ARGV: old stream id, group, stream fields (json), cost
local job, stream, work, old = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local status = redis.call('HGET', job, 'status')
redis.call('XACK', stream, ARGV[2], old)
local existed = redis.call('XDEL', stream, old) == 1
if status == 'done' or status == 'failed' or redis.call('HGET', job, 'released') == old then
  if existed then redis.call('DECRBY', work, ARGV[4]) end
  return 0
end
local fields = {}
for k, v in pairs(cjson.decode(ARGV[3])) do fields[#fields + 1] = k; fields[#fields + 1] = tostring(v) end
redis.call('XADD', stream, '*', unpack(fields))
redis.call('HSET', job, 'released', old)
if not existed then redis.call('INCRBY', work, ARGV[4]) end
return 1
"""

RECONCILE = """
-- KEYS: stream, work; ARGV: most entries to scan
if redis.call('XLEN', KEYS[1]) > tonumber(ARGV[1]) then return -1 end
local total = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local fields = entry[2]
  for i = 1, #fields, 2 do if fields[i] == 'cost' then total = total + (tonumber(fields[i + 1]) or 0) end end
end
redis.call('SET', KEYS[2], total)
return total
"""


def as_json(fields: dict) -> str:
    return json.dumps({k: str(v) for k, v in fields.items()})
