-- Lua scripts of the Redis backend, one per domain step; each is atomic in Redis. Sections are
-- separated by "--@name" lines and loaded by redis.rs. Every script touches keys of one agent
-- only ({agent} hash tag), so Redis Cluster can run it.
-- Time is Redis TIME (milliseconds), so every broker sharing the store agrees on deadlines.

--@_circuit
-- Library (included by "--#include _circuit"): the circuit breaker of mas_core::policy::circuit
-- in Lua, over the hash mas:{A}:circuit (s state c|o|h, f failures, w window start, u open
-- until, p probes, k successes, pu probes until; times in ms on the Redis clock). The contract
-- tests run the same sequences against this and the memory store.
local function circuit_config(argv, i)
  return {threshold = tonumber(argv[i]), window = tonumber(argv[i + 1]), open = tonumber(argv[i + 2]),
          successes = tonumber(argv[i + 3]), probes = tonumber(argv[i + 4])}
end
local function circuit_load(key)
  local v = redis.call('HMGET', key, 's', 'f', 'w', 'u', 'p', 'k', 'pu')
  return {s = v[1] or 'c', f = tonumber(v[2] or '0'), w = tonumber(v[3] or '0'), u = tonumber(v[4] or '0'),
          p = tonumber(v[5] or '0'), k = tonumber(v[6] or '0'), pu = tonumber(v[7] or '0')}
end
local function circuit_repr(c)
  return string.format('%s:%d:%.0f:%.0f:%d:%d:%.0f', c.s, c.f, c.w, c.u, c.p, c.k, c.pu)
end
local function circuit_save(key, c, cfg)
  redis.call('HSET', key, 's', c.s, 'f', c.f, 'w', string.format('%.0f', c.w), 'u', string.format('%.0f', c.u),
             'p', c.p, 'k', c.k, 'pu', string.format('%.0f', c.pu))
  redis.call('PEXPIRE', key, math.max(cfg.window, 2 * cfg.open) + 1000)
end
-- Admits one message (may move open -> half-open, takes a probe); false when refused.
local function circuit_admit(c, cfg, now)
  if c.s == 'o' then
    if now < c.u then return false end
    c.s = 'h'; c.p = 0; c.k = 0; c.pu = now + cfg.open
  end
  if c.s == 'h' then
    if now >= c.pu then c.p = 0; c.pu = now + cfg.open end
    if c.p >= cfg.probes then return false end
    c.p = c.p + 1
  end
  return true
end
local function circuit_record(c, cfg, success, now)
  if success then
    if c.s == 'h' then
      c.k = c.k + 1
      if c.k >= cfg.successes then c.s = 'c'; c.f = 0; c.w = now; c.p = 0; c.k = 0 end
    elseif c.s == 'c' then
      c.f = 0
    end
  elseif c.s == 'c' then
    if c.f == 0 or now - c.w > cfg.window then c.f = 0; c.w = now end
    c.f = c.f + 1
    if c.f >= cfg.threshold then c.s = 'o'; c.u = now + cfg.open end
  elseif c.s == 'h' then
    c.s = 'o'; c.u = now + cfg.open
  end
end

--@_audit
-- Library (included by "--#include _audit"): appends to an audit chain's stream. Entries get
-- the ids 0-1, 0-2, ... (XADD 0-*): the n-th record ever appended is entry 0-n, so the
-- archiver's trim finds the last record it archived by arithmetic and removes the records
-- before it with one XTRIM instead of reading them all again. A stream written by an earlier
-- version has time-based ids, which 0-* cannot follow; it keeps them (the trim then takes the
-- slow path).
local audit_id = nil
local function audit_add(stream, record)
  if audit_id == nil then
    local id = redis.pcall('XADD', stream, '0-*', 'r', record)
    if type(id) ~= 'table' then audit_id = '0-*' return id end
    audit_id = '*'
  end
  return redis.call('XADD', stream, audit_id, 'r', record)
end

--@_replies
-- Library (included by "--#include _replies"): how long an instance's replies queue (stream
-- and delayed set) outlives its session. Instance ids are rarely used again (most clients
-- draw a new one per process), so a queue nobody will read must go away by itself: every
-- lease acquisition and renewal sets it to expire `REPLY_RETENTION_MS` after the lease would,
-- and a reply queued for an instance with no session gives the queue that expiry if it has
-- none. A session that comes back within it (same instance id) finds its replies.
local REPLY_RETENTION_MS = 3600000
local function keep_replies(stream, delayed, lease_ttl_ms)
  local keep = tonumber(lease_ttl_ms) + REPLY_RETENTION_MS
  redis.call('PEXPIRE', stream, keep)
  redis.call('PEXPIRE', delayed, keep)
end
local function expire_orphan_replies(key)
  redis.call('PEXPIRE', key, REPLY_RETENTION_MS, 'NX')
end

--@enqueue
-- KEYS: stream, delayed. ARGV: envelope, max_len, notify channel.
if redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return redis.error_reply('queue_full')
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'a', '1')
redis.call('PUBLISH', ARGV[3], '1')
return id

--@_hand_back
-- Library: puts the claimed entry `id` of `stream` back at the tail, attempt unchanged, and
-- removes the claimed one. Returns 1, or 0 when the entry was gone (it is acknowledged anyway).
local function hand_back(stream, id)
  local entry = redis.call('XRANGE', stream, id, id)
  local back = 0
  if #entry == 1 then
    local f = {}
    for i = 1, #entry[1][2], 2 do f[entry[1][2][i]] = entry[1][2][i + 1] end
    redis.call('XADD', stream, '*', 'e', f['e'], 'a', f['a'])
    back = 1
  end
  redis.call('XACK', stream, 'mas', id)
  redis.call('XDEL', stream, id)
  return back
end

--@_claim
-- Library (included by "--#include _claim"): a session's claim. Made by --@claim, and by an
-- admission or reply commit on behalf of a session of this broker that waits for work (the
-- hand-off: the step that queues the work also claims it, saving the session's own round
-- trip). `k` holds the session's keys: lease, owners, work, work_delayed, replies,
-- replies_delayed. Reclaiming (flags reclaim_work, reclaim_replies) hands work held by
-- consumers whose lease is gone back to the tail, attempt unchanged; the broker asks for it at
-- most every 500 ms per queue, not per session: listing the consumers of a work stream that
-- thousands of sessions share is the costly part.
-- Returns out = {status, next_delayed_ms, tag, id, envelope, attempt, ...} (status 'lost' when
-- the lease is not the owner's: nothing is claimed then), and how many entries were handed
-- back from dead owners, read from the replies queue and read from the work queue.
--#include _hand_back
local function claim_for(k, owner, max, reclaim_work, reclaim_replies, now)
  if redis.call('GET', k.lease) ~= owner then return {'lost', -1}, 0, 0, 0 end

  local function promote(stream, delayed)
    local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 100)
    for _, m in ipairs(due) do
      local d = cjson.decode(m)
      redis.call('XADD', stream, '*', 'e', d.e, 'a', tostring(d.a))
      redis.call('ZREM', delayed, m)
    end
  end

  local function reclaim(stream)
    local handed = 0
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, 'mas')) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      local name = info['name']
      if name ~= owner then
        local deadline = redis.call('ZSCORE', k.owners, name)
        if (not deadline) or tonumber(deadline) <= now then
          local pending = redis.call('XPENDING', stream, 'mas', '-', '+', 100, name)
          for _, p in ipairs(pending) do handed = handed + hand_back(stream, p[1]) end
          if #pending < 100 then redis.call('XGROUP', 'DELCONSUMER', stream, 'mas', name) end
        end
      end
    end
    return handed
  end

  promote(k.replies, k.replies_delayed)
  promote(k.work, k.work_delayed)
  local handed = 0
  if reclaim_replies then handed = handed + reclaim(k.replies) end
  if reclaim_work then handed = handed + reclaim(k.work) end

  local out = {'ok', -1}
  local function read(stream, tag, count)
    if count <= 0 then return 0 end
    local got = redis.call('XREADGROUP', 'GROUP', 'mas', owner, 'COUNT', count, 'STREAMS', stream, '>')
    if not got then return 0 end
    local n = 0
    for _, entry in ipairs(got[1][2]) do
      -- Read the two fields in place: a table per entry costs more than the scan.
      local f, envelope, attempt = entry[2], '', '0'
      for i = 1, #f, 2 do
        if f[i] == 'e' then envelope = f[i + 1] elseif f[i] == 'a' then attempt = f[i + 1] end
      end
      out[#out + 1] = tag
      out[#out + 1] = entry[1]
      out[#out + 1] = envelope
      out[#out + 1] = attempt
      n = n + 1
    end
    return n
  end
  local from_replies = read(k.replies, 'r', max)
  local from_work = read(k.work, 'w', max - from_replies)

  local next_at = -1
  for _, delayed in ipairs({k.work_delayed, k.replies_delayed}) do
    local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
    if #first == 2 then
      local at = tonumber(first[2])
      if next_at < 0 or at < next_at then next_at = at end
    end
  end
  if next_at >= 0 then out[2] = math.max(0, next_at - now) end
  return out, handed, from_replies, from_work
end

-- A claim's session keys (see claim_for), KEYS[from .. from + 5]: a claim's own, or those a
-- hand-off names after its step's keys.
local function claim_keys(from)
  return {lease = KEYS[from], owners = KEYS[from + 1], work = KEYS[from + 2], work_delayed = KEYS[from + 3],
          replies = KEYS[from + 4], replies_delayed = KEYS[from + 5]}
end

--@claim
-- KEYS: lease, owners, work, work_delayed, replies, replies_delayed.
-- ARGV: owner, max, reclaim work (1|0), notify channel, reclaim replies (1|0).
-- Returns {status, next_delayed_ms, tag, id, envelope, attempt, ...} (see _claim).
--#include _claim
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out, handed = claim_for(claim_keys(1), ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', ARGV[5] == '1', now)
if handed > 0 then redis.call('PUBLISH', ARGV[4], '1') end
return out

--@own_pending
-- KEYS: work, replies. ARGV: owner, max.
-- Returns {tag, id, envelope, attempt, ...}: the entries pending under `owner` (what it holds,
-- including what a claim whose answer it never read gave it), replies first.
local out = {}
for i, stream in ipairs({KEYS[2], KEYS[1]}) do
  local tag = (i == 1) and 'r' or 'w'
  local left = tonumber(ARGV[2]) - #out / 4
  if left > 0 and redis.call('EXISTS', stream) == 1 then
    local ok, pending = pcall(redis.call, 'XPENDING', stream, 'mas', '-', '+', left, ARGV[1])
    if ok then
      for _, p in ipairs(pending) do
        local entry = redis.call('XRANGE', stream, p[1], p[1])
        if #entry == 1 then
          local f = {}
          for j = 1, #entry[1][2], 2 do f[entry[1][2][j]] = entry[1][2][j + 1] end
          out[#out + 1] = tag
          out[#out + 1] = p[1]
          out[#out + 1] = f['e'] or ''
          out[#out + 1] = f['a'] or '0'
        end
      end
    end
  end
end
return out

--@settle
-- KEYS: work, work_delayed, replies, replies_delayed, dlq, circuit, dlq dropped counter.
-- ARGV: owner, notify channel, circuit on (1|0), failure_threshold, window_ms, open_ms,
-- success_threshold, max_probes, max dead letters (the oldest beyond it are dropped and
-- counted), then per effect: op (ack|requeue|dead), tag (w|r), id,
-- attempt, delay_ms, reason, outcome (s success | f failure | '' none). Each effect is fenced:
-- applied only if `owner` holds the entry; only applied effects feed the circuit.
-- Returns one 1 (applied) or 0 (not owner) per effect.
-- Every redis.call costs far more than the Lua around it, so the fence is one XPENDING per
-- stream over the batch's id range, and the settled entries go in one XACK and one XDEL.
--#include _circuit
--#include _replies
local owner = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local on = ARGV[3] == '1'
local cfg = circuit_config(ARGV, 4)
local circuit, before = nil, nil
if on then circuit = circuit_load(KEYS[6]); before = circuit_repr(circuit) end
local max_dead = tonumber(ARGV[9])
local streams = {w = {KEYS[1], KEYS[2]}, r = {KEYS[3], KEYS[4]}}

-- Stream ids are "ms-seq"; they order by both numbers, not as text.
local function id_key(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms then return nil end
  return {tonumber(ms), tonumber(seq)}
end
local function id_less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end

-- held[tag][id]: the batch's entries that `owner` holds.
local PAGE = 10000
local held = {w = {}, r = {}}
local range = {w = {ids = {}}, r = {ids = {}}}
for i = 10, #ARGV, 7 do
  local r, id = range[ARGV[i + 1] == 'r' and 'r' or 'w'], ARGV[i + 2]
  local k = id_key(id)
  if k then
    r.ids[#r.ids + 1] = id
    if not r.low or id_less(k, r.low) then r.low, r.first = k, id end
    if not r.high or id_less(r.high, k) then r.high, r.last = k, id end
  end
end
for tag, r in pairs(range) do
  if r.first then
    local stream = streams[tag][1]
    local pending = redis.call('XPENDING', stream, 'mas', r.first, r.last, PAGE, owner)
    for _, p in ipairs(pending) do held[tag][p[1]] = true end
    -- A full page may have cut the range short: ask for the rest one by one.
    if #pending == PAGE then
      for _, id in ipairs(r.ids) do
        if not held[tag][id] then
          local p = redis.call('XPENDING', stream, 'mas', id, id, 1)
          if #p == 1 and p[1][2] == owner then held[tag][id] = true end
        end
      end
    end
  end
end

local function envelope_of(stream, id)
  local entry = redis.call('XRANGE', stream, id, id)
  if #entry == 1 then
    for j = 1, #entry[1][2], 2 do
      if entry[1][2][j] == 'e' then return entry[1][2][j + 1] end
    end
  end
  return ''
end

local results = {}
local settled = {w = {}, r = {}}
local wake = false
for i = 10, #ARGV, 7 do
  local op, tag, id, attempt, delay, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4]), ARGV[i + 5]
  local outcome = ARGV[i + 6]
  if tag ~= 'r' then tag = 'w' end
  local stream, delayed = streams[tag][1], streams[tag][2]
  if not held[tag][id] then
    results[#results + 1] = 0
  else
    -- One effect per entry: a second one for the same entry is not applied.
    held[tag][id] = nil
    if op == 'requeue' then
      -- A delayed requeue wakes claims too: a claim that found the queues drained waits for
      -- a wake-up before it asks again, and must learn when this entry comes due.
      wake = true
      local envelope = envelope_of(stream, id)
      if delay <= 0 then
        redis.call('XADD', stream, '*', 'e', envelope, 'a', attempt)
      else
        redis.call('ZADD', delayed, now + delay, cjson.encode({e = envelope, a = tonumber(attempt), n = id}))
        if tag == 'r' then expire_orphan_replies(delayed) end
      end
    elseif op == 'dead' then
      redis.call('XADD', KEYS[5], '*', 'e', envelope_of(stream, id), 'reason', reason, 'attempts', attempt, 'at', tostring(now))
      local over = redis.call('XLEN', KEYS[5]) - max_dead
      if over > 0 then
        redis.call('XTRIM', KEYS[5], 'MAXLEN', max_dead)
        redis.call('INCRBY', KEYS[7], over)
      end
    end
    settled[tag][#settled[tag] + 1] = id
    if on and outcome ~= '' then circuit_record(circuit, cfg, outcome == 's', now) end
    results[#results + 1] = 1
  end
end
-- unpack is bounded by Lua's stack: settle in chunks.
for tag, ids in pairs(settled) do
  local stream = streams[tag][1]
  for i = 1, #ids, 1000 do
    local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
    redis.call('XACK', stream, 'mas', unpack(chunk))
    redis.call('XDEL', stream, unpack(chunk))
  end
end
if on and circuit_repr(circuit) ~= before then circuit_save(KEYS[6], circuit, cfg) end
if wake then redis.call('PUBLISH', ARGV[2], '1') end
return results

--@release
-- KEYS: work, replies. ARGV: owner, notify channel. Hands back everything `owner` holds.
--#include _hand_back
local owner = ARGV[1]
local n = 0
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    for _, p in ipairs(redis.call('XPENDING', stream, 'mas', '-', '+', 10000, owner)) do
      n = n + hand_back(stream, p[1])
    end
  end
end
if n > 0 then redis.call('PUBLISH', ARGV[2], '1') end
return n

--@lease_acquire
-- KEYS: lease, owners, work, replies, replies delayed. ARGV: owner, ttl_ms, the owner's
-- broker prefix and incarnation prefix ('' for none; mas_core OwnerToken::origin_prefixes).
-- Returns 1 if taken, 0 if held. A lease held by an earlier incarnation of the same broker is taken over
-- (OwnerToken::supersedes): that session died with its process, and dropping it from the
-- owners makes the next claim hand its work back.
--#include _replies
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  local broker, incarnation = ARGV[3], ARGV[4]
  local earlier = broker ~= '' and current:sub(1, #broker) == broker and current:sub(1, #incarnation) ~= incarnation
  if not earlier then return 0 end
  redis.call('ZREM', KEYS[2], current)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86400000)
for _, stream in ipairs({KEYS[3], KEYS[4]}) do
  redis.pcall('XGROUP', 'CREATE', stream, 'mas', '0', 'MKSTREAM')
end
keep_replies(KEYS[4], KEYS[5], ARGV[2])
return 1

--@lease_renew
-- KEYS: lease, owners, replies, replies delayed. ARGV: owner, ttl_ms. Returns 1 if renewed,
-- 0 if the lease is not ours.
--#include _replies
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
keep_replies(KEYS[3], KEYS[4], ARGV[2])
return 1

--@lease_release
-- KEYS: lease, owners, replies, replies delayed. ARGV: owner, notify channel.
-- The session's replies queue goes with it when it is empty (a reply still on its way
-- creates it again, expiring; see _replies).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if redis.call('XLEN', KEYS[3]) == 0 and redis.call('ZCARD', KEYS[4]) == 0 then
    redis.call('DEL', KEYS[3], KEYS[4])
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], '1')
return 1

--@live
-- KEYS: owners. Returns the number of owners whose lease deadline is in the future.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')

--@open_request
-- KEYS: pending, pending index (zset: correlation id -> when it is forgotten).
-- ARGV: requester, requester_instance, target, ttl_ms, grace_ms, max pending, correlation id.
-- Returns 1, or 0 when the requester already has max pending requests (nothing written).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
local keep = ttl + tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return 0 end
local record = cjson.encode({requester = ARGV[1], requester_instance = ARGV[2], target = ARGV[3], expires_at = now + ttl})
redis.call('SET', KEYS[1], record, 'PX', keep)
redis.call('ZADD', KEYS[2], now + keep, ARGV[7])
redis.call('PEXPIRE', KEYS[2], keep, 'NX')
redis.call('PEXPIRE', KEYS[2], keep, 'GT')
return 1

--@correlation
-- KEYS: pending, receipt. Returns {'answered', sender, fingerprint, message_id} |
-- {'pending', requester, instance, target} | {'expired'} | {'unknown'}.
local receipt = redis.call('GET', KEYS[2])
if receipt then
  local r = cjson.decode(receipt)
  return {'answered', r.sender, r.fingerprint, r.message_id}
end
local pending = redis.call('GET', KEYS[1])
if not pending then return {'unknown'} end
local p = cjson.decode(pending)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now >= p.expires_at then return {'expired'} end
return {'pending', p.requester, p.requester_instance, p.target}

--@commit_replies
-- Commits a batch of replies to requests of one requester, with their audit records in the
-- requester's chain (group commit, as --@admit does for admissions).
-- KEYS: audit stream, audit head, pending index, then per reply: pending, receipt, replies
-- stream, replies delayed (all the requester's), then with a hand-off the waiting session's
-- keys (see _claim).
-- ARGV: requester, expected audit head ('' empty chain, '?' unknown), new audit head, max audit
-- records, max queue length, notify channel, hand-off owner ('' for none), its room, its
-- reclaim flags, then per reply: requester_instance, target, sender, fingerprint, message_id,
-- envelope, audit record, correlation id.
-- Pass 1 writes nothing: each reply must answer a live pending request of its target, and its
-- replies queue must have room. Any refusal returns {'refused', index, outcome, message id,
-- ...} (outcome already | completed | expired | unknown): the broker answers those, re-links
-- the rest and retries. Pass 2 queues every reply, appends every record, stores the receipts
-- and moves the head; then the hand-off claims for its session.
-- Returns {'ok', then the hand-off's claim (see _claim)} | {'head', actual} (nothing written) |
-- {'full'} | {'refused', ...}.
--#include _audit
--#include _replies
--#include _claim
local FIXED = 9
local head = redis.call('GET', KEYS[2]) or ''
if head ~= ARGV[2] then return {'head', head} end
local items = (#ARGV - FIXED) / 8
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_len = tonumber(ARGV[5])
local refused = {'refused'}
local expires = {}
local room = {}
for i = 1, items do
  local k, a = 3 + 4 * (i - 1), FIXED + 8 * (i - 1)
  local outcome, id = nil, ''
  local receipt = redis.call('GET', KEYS[k + 2])
  if receipt then
    local r = cjson.decode(receipt)
    if r.sender == ARGV[a + 3] and r.fingerprint == ARGV[a + 4] then outcome, id = 'already', r.message_id
    else outcome = 'completed' end
  else
    local pending = redis.call('GET', KEYS[k + 1])
    if not pending then outcome = 'unknown'
    else
      local p = cjson.decode(pending)
      if p.requester ~= ARGV[1] or p.requester_instance ~= ARGV[a + 1] or p.target ~= ARGV[a + 2] then
        outcome = 'completed'
      elseif now >= p.expires_at then
        outcome = 'expired'
      else
        local stream = KEYS[k + 3]
        if room[stream] == nil then
          room[stream] = max_len - redis.call('XLEN', stream) - redis.call('ZCARD', KEYS[k + 4])
        end
        if room[stream] <= 0 then outcome = 'completed' else room[stream] = room[stream] - 1 end
        expires[i] = p.expires_at
      end
    end
  end
  if outcome then
    refused[#refused + 1] = i; refused[#refused + 1] = outcome; refused[#refused + 1] = id
  end
end
if #refused > 1 then return refused end
if redis.call('XLEN', KEYS[1]) + items > tonumber(ARGV[4]) then return {'full'} end
for i = 1, items do
  local k, a = 3 + 4 * (i - 1), FIXED + 8 * (i - 1)
  redis.call('XADD', KEYS[k + 3], '*', 'e', ARGV[a + 6], 'a', '1')
  expire_orphan_replies(KEYS[k + 3])
  audit_add(KEYS[1], ARGV[a + 7])
  local remaining = math.max(1, expires[i] - now)
  redis.call('SET', KEYS[k + 2], cjson.encode({sender = ARGV[a + 3], fingerprint = ARGV[a + 4], message_id = ARGV[a + 5]}), 'PX', remaining)
  redis.call('DEL', KEYS[k + 1])
  redis.call('ZREM', KEYS[3], ARGV[a + 8])
end
redis.call('SET', KEYS[2], ARGV[3])
-- Every session of the requester is woken unless the hand-off took all this step queued.
local out = {'ok'}
local wake = true
if ARGV[7] ~= '' then
  local seat = claim_keys(4 + 4 * items)
  local to_seat = 0
  for i = 1, items do
    if KEYS[3 + 4 * (i - 1) + 3] == seat.replies then to_seat = to_seat + 1 end
  end
  local claimed, handed, from_replies = claim_for(seat, ARGV[7], tonumber(ARGV[8]),
    string.sub(ARGV[9], 1, 1) == '1', string.sub(ARGV[9], 2, 2) == '1', now)
  for _, v in ipairs(claimed) do out[#out + 1] = v end
  wake = handed > 0 or to_seat < items or from_replies < to_seat
end
if wake then redis.call('PUBLISH', ARGV[6], '1') end
return out

--@state_get
-- KEYS: state, revision. Returns {revision, field, value, ...}.
local out = {tonumber(redis.call('GET', KEYS[2]) or '0')}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out

--@state_update
-- KEYS: state, revision. ARGV: expected revision ('' = unconditional), max bytes (names plus
-- values after the merge), field, value, ...
-- Returns {1, new revision}, {0, current revision} or {2, bytes it would hold}.
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then return {0, current} end
local sizes = {}
local stored = redis.call('HGETALL', KEYS[1])
for i = 1, #stored, 2 do sizes[stored[i]] = #stored[i] + #stored[i + 1] end
for i = 3, #ARGV, 2 do sizes[ARGV[i]] = #ARGV[i] + #ARGV[i + 1] end
local bytes = 0
for _, size in pairs(sizes) do bytes = bytes + size end
if bytes > tonumber(ARGV[2]) then return {2, bytes} end
if #ARGV < 4 then return {1, current} end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {1, redis.call('INCR', KEYS[2])}

--@state_reset
-- KEYS: state, revision. ARGV: expected revision ('' = unconditional).
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then return {0, current} end
redis.call('DEL', KEYS[1])
return {1, redis.call('INCR', KEYS[2])}

--@rate_admit
-- KEYS: rate hash. ARGV: per_minute, per_hour, count. GCRA per window (times in µs, Redis
-- clock), for up to `count` messages arriving together (mas_core ratelimit::admit_many):
-- admit if max(tat, now) + I - now <= T with I = T / limit; a refusal writes nothing, and every
-- message after it is refused too. Returns {admitted} when all were admitted, else
-- {admitted, window (0 minute, 1 hour), retry_after_us (-1: limit 0)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function step(limit, period, tat)
  if limit == 0 then return nil, -1 end
  local new = math.max(tat, now) + math.floor(period / limit)
  if new - now > period then return nil, new - now - period end
  return new, 0
end
local per_minute, per_hour, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local m = tonumber(redis.call('HGET', KEYS[1], 'm') or '0')
local h = tonumber(redis.call('HGET', KEYS[1], 'h') or '0')
local admitted, refusal = 0, nil
while admitted < count do
  local next_m, retry_m = step(per_minute, 60000000, m)
  if not next_m then refusal = {0, retry_m} break end
  local next_h, retry_h = step(per_hour, 3600000000, h)
  if not next_h then refusal = {1, retry_h} break end
  m, h, admitted = next_m, next_h, admitted + 1
end
if admitted > 0 then
  redis.call('HSET', KEYS[1], 'm', string.format('%.0f', m), 'h', string.format('%.0f', h))
  redis.call('PEXPIRE', KEYS[1], 3601000)
end
if refusal then return {admitted, refusal[1], refusal[2]} end
return {admitted}

--@gate
-- KEYS: owners, circuit. ARGV: circuit on (1|0), failure_threshold, window_ms, open_ms,
-- success_threshold, max_probes. Returns {live owners, 1 if the circuit would admit now,
-- 1 if it is closed (or off)}. Reads only: no probe is taken.
--#include _circuit
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
local admits, closed = 1, 1
if ARGV[1] == '1' then
  local circuit = circuit_load(KEYS[2])
  if circuit.s ~= 'c' then closed = 0 end
  if not circuit_admit(circuit, circuit_config(ARGV, 2), now) then admits = 0 end
end
return {live, admits, closed}

--@queue_gauges
-- KEYS: work stream, work delayed, circuit, audit stream, dlq, dlq dropped counter. Reads only.
-- Returns {depth, envelope at the head of the stream or '', circuit phase c|h|o, audit records,
-- dead letters, dead letters dropped}; an open circuit past its open period reads 'h'.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local depth = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local envelope = ''
if head[1] then
  local fields = head[1][2]
  for i = 1, #fields, 2 do if fields[i] == 'e' then envelope = fields[i + 1] end end
end
local c = redis.call('HMGET', KEYS[3], 's', 'u')
local phase = c[1] or 'c'
if phase == 'o' and now >= tonumber(c[2] or '0') then phase = 'h' end
return {depth, envelope, phase, redis.call('XLEN', KEYS[4]), redis.call('XLEN', KEYS[5]),
  tonumber(redis.call('GET', KEYS[6]) or '0')}

--@admit
-- Audited admission of a batch of decisions recorded in one agent's chain (group commit).
-- KEYS: audit stream, audit head, circuit, work stream, work delayed (all of one agent), then
-- with a hand-off the waiting session's keys (see _claim).
-- ARGV: expected head ('' empty chain, '?' unknown), max_queue_len, max audit records, notify
-- channel, circuit on (1|0), failure_threshold, window_ms, open_ms, success_threshold,
-- max_probes, new head, hand-off owner ('' for none), its room, its reclaim flags (work,
-- replies: '1' or '0' each), then per item: routable (1|0), record JSON, envelope.
-- Pass 1 writes nothing: the head must be the expected one and the chain must have room; each
-- routable item needs queue room and the circuit's admission (probes counted across the
-- batch). Any refusal returns {'refused', index, reason, ...}: the broker records those items
-- as refused, re-links the batch and retries. Pass 2 appends every record, queues every
-- routable envelope and moves the head; then the hand-off claims for its session.
-- Returns {'ok', entry id or '' per item, then the hand-off's claim (see _claim)} |
-- {'head', actual} | {'full'} | {'refused', ...}.
--#include _circuit
--#include _audit
--#include _claim
local FIXED = 14
local head = redis.call('GET', KEYS[2]) or ''
if ARGV[1] ~= head then return {'head', head} end
local items = (#ARGV - FIXED) / 3
if redis.call('XLEN', KEYS[1]) + items > tonumber(ARGV[3]) then return {'full'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local on = ARGV[5] == '1'
local cfg = circuit_config(ARGV, 6)
local circuit, before = nil, nil
if on then circuit = circuit_load(KEYS[3]); before = circuit_repr(circuit) end
local room = tonumber(ARGV[2]) - redis.call('XLEN', KEYS[4]) - redis.call('ZCARD', KEYS[5])
local refused = {'refused'}
for i = 1, items do
  if ARGV[FIXED - 2 + 3 * i] == '1' then
    if room <= 0 then
      refused[#refused + 1] = i; refused[#refused + 1] = 'queue_full'
    elseif on and not circuit_admit(circuit, cfg, now) then
      refused[#refused + 1] = i; refused[#refused + 1] = 'circuit_open'
    else
      room = room - 1
    end
  end
end
if #refused > 1 then return refused end
local out = {'ok'}
local routed = 0
for i = 1, items do
  audit_add(KEYS[1], ARGV[FIXED - 1 + 3 * i])
  if ARGV[FIXED - 2 + 3 * i] == '1' then
    out[#out + 1] = redis.call('XADD', KEYS[4], '*', 'e', ARGV[FIXED + 3 * i], 'a', '1')
    routed = routed + 1
  else
    out[#out + 1] = ''
  end
end
redis.call('SET', KEYS[2], ARGV[11])
if on and circuit_repr(circuit) ~= before then circuit_save(KEYS[3], circuit, cfg) end
-- Every session of the agent is woken unless the hand-off took all this step queued.
local wake = routed > 0
if ARGV[12] ~= '' then
  local claimed, handed, _, from_work = claim_for(claim_keys(6), ARGV[12], tonumber(ARGV[13]),
    string.sub(ARGV[14], 1, 1) == '1', string.sub(ARGV[14], 2, 2) == '1', now)
  for _, v in ipairs(claimed) do out[#out + 1] = v end
  wake = handed > 0 or from_work < routed
end
if wake then redis.call('PUBLISH', ARGV[4], '1') end
return out

--@audit_append
-- Compare-and-append to a chain (the security chain). KEYS: stream, head. ARGV: expected head
-- ('' empty, '?' unknown), record JSON, new head, max records.
-- Returns {'ok'} | {'head', actual} | {'full'}.
--#include _audit
local head = redis.call('GET', KEYS[2]) or ''
if head ~= ARGV[1] then return {'head', head} end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[4]) then return {'full'} end
audit_add(KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
return {'ok'}

--@audit_tail
-- A consistent snapshot point of a chain. KEYS: stream, head, checkpoint.
-- Returns {head or '', last id or '', archived, base or ''}.
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = ''
if #last == 1 then id = last[1][1] end
return {redis.call('GET', KEYS[2]) or '', id, redis.call('HGET', KEYS[3], 'archived') or '0',
        redis.call('HGET', KEYS[3], 'base') or ''}

--@audit_trim
-- Removes the oldest `count` records of a chain once archived, if the count-th is still the
-- given record (else the chain changed or another archiver was first: nothing is removed),
-- and moves the checkpoint past them. KEYS: stream, checkpoint. ARGV: count, last record JSON,
-- last record's hash. Returns {archived, base} or {}.
-- With 0-n ids (see _audit) the live records are 0-(archived+1), 0-(archived+2), ...: if the
-- oldest is 0-(archived+1) and 0-(archived+count) is the given record, the count records are
-- exactly those ids and one XTRIM MINID removes them. Otherwise (time-based ids of an earlier
-- version, or a chain that does not look as expected) the records are read and compared.
local count = tonumber(ARGV[1])
if count == 0 then return {} end
local archived = tonumber(redis.call('HGET', KEYS[2], 'archived') or '0')
local function record_of(entry)
  for j = 1, #entry[2], 2 do
    if entry[2][j] == 'r' then return entry[2][j + 1] end
  end
  return ''
end
local function moved()
  local total = string.format('%d', archived + count)
  redis.call('HSET', KEYS[2], 'archived', total, 'base', ARGV[3])
  return {total, ARGV[3]}
end
local first_id = string.format('0-%d', archived + 1)
local last_id = string.format('0-%d', archived + count)
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first == 1 and first[1][1] == first_id then
  local last = redis.call('XRANGE', KEYS[1], last_id, last_id)
  if #last == 1 and record_of(last[1]) == ARGV[2] then
    redis.call('XTRIM', KEYS[1], 'MINID', string.format('0-%d', archived + count + 1))
    return moved()
  end
end
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', count)
if #entries ~= count or record_of(entries[count]) ~= ARGV[2] then return {} end
for i = 1, count, 500 do
  local ids = {}
  for k = i, math.min(i + 499, count) do ids[#ids + 1] = entries[k][1] end
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return moved()

--@dlq_list
-- KEYS: dlq. ARGV: max. Returns {now_ms, id, envelope, reason, attempts, at_ms, ...}, oldest
-- first: the ages are read against the same clock that stamped `at`.
local t = redis.call('TIME')
local out = {tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[1]))) do
  local f = {}
  for j = 1, #entry[2], 2 do f[entry[2][j]] = entry[2][j + 1] end
  out[#out + 1] = entry[1]
  out[#out + 1] = f.e or ''
  out[#out + 1] = f.reason or ''
  out[#out + 1] = f.attempts or '0'
  out[#out + 1] = f.at or '0'
end
return out

--@dlq_redrive
-- KEYS: dlq, work, work_delayed. ARGV: max queue length, notify channel, then dead-letter
-- ids. Each letter still in the DLQ moves to the work stream with a fresh attempt count,
-- unless the queue is full (it then stays). Returns per id: the new entry id, 'missing' or
-- 'full'.
local out = {}
local moved = false
for i = 3, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #entry == 0 then
    out[#out + 1] = 'missing'
  elseif redis.call('XLEN', KEYS[2]) + redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[1]) then
    out[#out + 1] = 'full'
  else
    local envelope = ''
    for j = 1, #entry[1][2], 2 do
      if entry[1][2][j] == 'e' then envelope = entry[1][2][j + 1] end
    end
    out[#out + 1] = redis.call('XADD', KEYS[2], '*', 'e', envelope, 'a', '1')
    redis.call('XDEL', KEYS[1], ARGV[i])
    moved = true
  end
end
if moved then redis.call('PUBLISH', ARGV[2], '1') end
return out

--@authz_get
-- KEYS: the overlay hash (`rev`, `doc`). ARGV: the revision the caller has. Returns {rev} when
-- it is unchanged, else {rev, doc}; a never-written overlay is revision 0.
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev == tonumber(ARGV[1]) then return {rev} end
return {rev, redis.call('HGET', KEYS[1], 'doc') or ''}

--@authz_put
-- KEYS: the overlay hash. ARGV: expected revision, document. Returns {1, new rev} or
-- {0, current rev} when another change came first.
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return {0, rev} end
redis.call('HSET', KEYS[1], 'rev', rev + 1, 'doc', ARGV[2])
return {1, rev + 1}

--@rate_backlog
-- KEYS: rate hash. Returns {now_us, minute tat_us, hour tat_us} by the Redis clock (0 when
-- unset).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local m = redis.call('HGET', KEYS[1], 'm') or '0'
local h = redis.call('HGET', KEYS[1], 'h') or '0'
return {string.format('%.0f', now), m, h}

--@lease_revoke
-- KEYS: lease, owners. ARGV: notify channel. Ends the lease whoever holds it: its holder's
-- next renewal fails, and its claimed work is reclaimable at once. Returns 1 if there was one.
local owner = redis.call('GET', KEYS[1])
if not owner then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], owner)
redis.call('PUBLISH', ARGV[1], '1')
return 1
