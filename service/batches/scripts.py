"""The Lua scripts of sample sets: each changes a set's records in one atomic step (service/batches/sets.py)."""

# KEYS: batch hash, done bitmap, stream. ARGV: index, group, entry id, now, outcome ("done"|"failed"),
# error and message of a failed image ("": none), when the image started (its sample's admission; "": unknown).
# The first failure's reason becomes the set's `error` and `message` (a stop's reason, set before, stays);
# `started_at` is the earliest start of a finished image (the set's images/s counts from it).
RECORD_LUA = """
local counted = 0
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('SETBIT', KEYS[2], ARGV[1], 1) == 0 then
  counted = 1
  local field = ARGV[5] == 'done' and 'done' or 'failed'
  redis.call('HINCRBY', KEYS[1], field, 1)
  if field == 'done' then
    redis.call('HSETNX', KEYS[1], 'first_done_at', ARGV[4])
    redis.call('HSET', KEYS[1], 'last_done_at', ARGV[4])
    local started = tonumber(ARGV[8] or '')
    if started then
      local before = tonumber(redis.call('HGET', KEYS[1], 'started_at') or '')
      if not before or started < before then redis.call('HSET', KEYS[1], 'started_at', ARGV[8]) end
    end
  elseif (ARGV[6] or '') ~= '' then
    redis.call('HSETNX', KEYS[1], 'error', ARGV[6])
    redis.call('HSETNX', KEYS[1], 'message', ARGV[7])
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  local h = redis.call('HMGET', KEYS[1], 'done', 'failed', 'total', 'ttl_s', 'status')
  if tonumber(h[1] or 0) + tonumber(h[2] or 0) >= tonumber(h[3]) and h[5] == 'running' then
    redis.call('HSET', KEYS[1], 'status', tonumber(h[2] or 0) > 0 and 'failed' or 'done', 'finished_at', ARGV[4])
    if h[4] then  -- its records (and so its file) go ttl_s after it completes
      redis.call('EXPIRE', KEYS[1], h[4])
      redis.call('EXPIRE', KEYS[2], h[4])
    end
  end
end
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[3], ARGV[3])
return counted
"""

# KEYS: held, batch hash, batches zset. ARGV: id, bytes, volume, max bytes (0: none), expire s, created at,
# the hash's fields as a JSON list, key prefix. Returns {1, held before} or {0, held} when the budget has no
# room. A failed set holds nothing (its file is useless and the sweeper removes it): it is not counted.
CREATE_LUA = """
local held = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if redis.call('HGET', ARGV[8] .. ':batch:' .. all[i], 'status') ~= 'failed' then
    held = held + cjson.decode(all[i + 1])['bytes']
  end
end
local need, most = tonumber(ARGV[2]), tonumber(ARGV[4])
if most > 0 and held + need > most then return {0, held} end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({bytes = need, volume = ARGV[3]}))
redis.call('HSET', KEYS[2], unpack(cjson.decode(ARGV[7])))
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return {1, held}
"""

# KEYS: stream, batch hash, lease. ARGV: lease owner, lease ms, enqueued after, then one JSON list of
# fields per job. Appends only while the lease is ours and the set exists: a deleted set gets no more jobs.
APPEND_LUA = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
for i = 4, #ARGV do redis.call('XADD', KEYS[1], '*', unpack(cjson.decode(ARGV[i]))) end
redis.call('HSET', KEYS[2], 'enqueued', ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
"""

# KEYS: batch hash, done bitmap. ARGV: error, message, now. Stops a running set: workers drop its samples.
STOP_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'message', ARGV[2], 'finished_at', ARGV[3])
local ttl = redis.call('HGET', KEYS[1], 'ttl_s')
if ttl then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""

# KEYS: batch hash, done bitmap, lease, batches zset. ARGV: id, owner. Returns {volume, bytes}, or false
# (no such set, or another key's). The held bytes stay until its file is removed.
DELETE_LUA = """
local f = redis.call('HMGET', KEYS[1], 'total', 'owner', 'volume', 'bytes')
if not f[1] or (f[2] or '') ~= ARGV[2] then return false end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return {f[3] or 'default', f[4] or '0'}
"""
