#!lua name=engram_v4
-- Engram's Redis Functions. Loaded once per primary (FUNCTION LOAD REPLACE) by the operator, the CLI or
-- the store itself when its user may; tenants' Redis users may only FCALL them (no EVAL, no SCRIPT).
-- Every function takes the keys of ONE session (one hash tag), plus the tenant's own keys where noted: the
-- session index, the usage hash and expiry zset (quotas), the rate key, a subject's session set (see
-- docs/design.md on Redis Cluster). Functions that change a session's messages take the SESSION KEYS, in
-- this order: log, meta, turns, index, archive, usage, expiry, summary, facts, blocks (the LlamaIndex memory
-- blocks' state, deleted with the session) and, for commit and delete_session, the subject's set as an
-- optional 11th.
-- Any change to this file must rename the library (engram_vN) and its functions: ensure_library REPLACEs
-- a library of the same name whose code differs, so two releases sharing a name would keep swapping it.
-- Stream entry fields: role, content, tokens (counted once, at write time), turn (optional), extra (optional).

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function entries_by_ids(log, ids)
  local out = {}
  for id in string.gmatch(ids, '%S+') do
    local found = redis.call('XRANGE', log, id, id)
    if found[1] then out[#out + 1] = found[1] end
  end
  return out
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A new epoch differs from every earlier epoch of this session key: it is the server's clock in
-- microseconds, bumped past the previous epoch when the clock has not moved.
local function new_epoch(meta)
  local t = redis.call('TIME')
  local candidate = t[1] .. string.format('%06d', tonumber(t[2]))
  local old = redis.call('HGET', meta, 'epoch')
  if old and tonumber(candidate) <= tonumber(old) then candidate = string.format('%.0f', tonumber(old) + 1) end
  redis.call('HSET', meta, 'epoch', candidate)
  return candidate
end

-- Tenant usage, for quotas. usage (hash): session id -> bytes of its messages (role, content and extra of
-- the log and the archive), and TOTAL -> the tenant's sum. expiry (zset): session id -> the ms at which
-- its keys expire ('inf' without TTL); its size is the tenant's session count. Expired sessions leave
-- both when a later call sweeps them (sweep_expired), so no reader needs keyspace notifications.
local TOTAL = ':bytes'  -- never a session id: ids start with a letter or digit

local function entry_bytes(fields)
  return #(field(fields, 'role') or '') + #(field(fields, 'content') or '') + #(field(fields, 'extra') or '')
end

local function entries_bytes(entries)
  local n = 0
  for i = 1, #entries do n = n + entry_bytes(entries[i][2]) end
  return n
end

local function stream_bytes(stream)
  local n, lower, chunk = 0, '-', 256
  while true do
    local batch = redis.call('XRANGE', stream, lower, '+', 'COUNT', chunk)
    n = n + entries_bytes(batch)
    if #batch < chunk then return n end
    lower = '(' .. batch[#batch][1]
  end
end

local function add_usage(usage, session_id, delta)
  if delta ~= 0 then
    redis.call('HINCRBY', usage, session_id, delta)
    redis.call('HINCRBY', usage, TOTAL, delta)
  end
end

local function forget_usage(usage, expiry, session_id)
  local counted = tonumber(redis.call('HGET', usage, session_id) or 0)
  -- (never HINCRBY by -0: Lua writes it "-0", which Redis refuses as an integer)
  if counted ~= 0 then redis.call('HINCRBY', usage, TOTAL, 0 - counted) end
  redis.call('HDEL', usage, session_id)
  redis.call('ZREM', expiry, session_id)
end

-- Make sure the session's bytes are counted: a session stored before usage was counted is read once.
local function track_usage(keys, session_id)
  if redis.call('HEXISTS', keys[6], session_id) == 1 then return end
  add_usage(keys[6], session_id, stream_bytes(keys[1]) + stream_bytes(keys[5]))
  redis.call('HSETNX', keys[6], session_id, 0)
end

-- Sessions whose keys expired (a second ago or more, clear of clock jitter) leave the tenant's usage.
-- At most `limit` per call: a turn's cost stays bounded; the usage function sweeps them all.
local function sweep_expired(usage, expiry, now, limit)
  local gone = redis.call('ZRANGE', expiry, '-inf', now - 1000, 'BYSCORE', 'LIMIT', 0, limit)
  for i = 1, #gone do forget_usage(usage, expiry, gone[i]) end
  return #gone
end

-- The session's own keys (log, meta, turns, archive, summary) get the TTL, and expiry records when they go.
local function apply_ttl(keys, session_id, ttl, now)
  for _, i in ipairs({ 1, 2, 3, 5, 8 }) do
    if ttl > 0 then redis.call('EXPIRE', keys[i], ttl) else redis.call('PERSIST', keys[i]) end
  end
  if ttl > 0 then redis.call('ZADD', keys[7], now + ttl * 1000, session_id)
  else redis.call('ZADD', keys[7], 'inf', session_id) end
end

-- GCRA over the tenant's rate key: `burst` requests at once, then `rate` per second. Returns 0 when this
-- request is allowed (and counts it), else how many ms until one would be (and counts nothing).
local function take_rate(key, rate, burst, now)
  if rate <= 0 then return 0 end
  local interval = 1000 / rate
  local tat = tonumber(redis.call('HGET', key, 'tat') or now) or now
  if tat < now then tat = now end
  local next_tat = tat + interval
  local allowed_at = next_tat - math.max(burst, 1) * interval
  if allowed_at > now then return math.max(1, math.ceil(allowed_at - now)) end
  redis.call('HSET', key, 'tat', string.format('%.3f', next_tat))
  redis.call('EXPIRE', key, math.ceil((next_tat - now) / 1000) + 1)
  return 0
end

local function rate_limited(wait_ms)
  return redis.error_reply('ENGRAM_RATE ' .. wait_ms)
end

-- A subject's set lists its sessions; it expires with the last of them (every session of a tenant has
-- the same TTL, so the newest commit's TTL is the latest).
local function link_subject(keys, session_id, subject, ttl)
  if subject == '' then return end
  redis.call('HSET', keys[2], 'subject', subject)
  redis.call('SADD', keys[11], session_id)
  if ttl > 0 then
    if redis.call('TTL', keys[11]) < ttl then redis.call('EXPIRE', keys[11], ttl) end
  else
    redis.call('PERSIST', keys[11])
  end
end

-- Trim to max messages; forget the turn ids of trimmed messages so the idempotency map stays bounded.
-- Returns the bytes trimmed.
local function apply_retention(log, turns, max)
  if max <= 0 then return 0 end
  local len = redis.call('XLEN', log)
  if len <= max then return 0 end
  local old = redis.call('XRANGE', log, '-', '+', 'COUNT', len - max)
  for i = 1, #old do
    local turn = field(old[i][2], 'turn')
    if turn then redis.call('HDEL', turns, turn) end
  end
  redis.call('XTRIM', log, 'MAXLEN', max)
  return entries_bytes(old)
end

local function append_messages(log, args, first, count, turn_id)
  local entries = {}
  for i = 0, count - 1 do
    local base = first + i * 4
    local fields = { 'role', args[base], 'content', args[base + 1], 'tokens', args[base + 2] }
    if turn_id ~= '' then
      fields[#fields + 1] = 'turn'; fields[#fields + 1] = turn_id
    end
    if args[base + 3] ~= '' then
      fields[#fields + 1] = 'extra'; fields[#fields + 1] = args[base + 3]
    end
    local id = redis.call('XADD', log, '*', unpack(fields))
    entries[#entries + 1] = { id, fields }
  end
  return entries
end

local function set_label(meta, label)
  if label ~= '' then redis.call('HSET', meta, 'key', label) end
end

local load_summary  -- defined with the rolling summary's functions, near the end of this file

-- load_window: KEYS log, meta, turns, summary, rate. ARGV cached_epoch, after_id, token_budget, max_count,
-- turn_id, summary_batch, rate, burst. Returns {epoch, first_id, complete, replay, entries newest-first,
-- summary}. Reads only the entries newer than after_id (when the cached epoch still holds) that fit the
-- budget: never the whole session. summary (see load_summary) is {} unless summary_batch > 0. With
-- rate > 0 the tenant's request rate is checked (and counted) first: over it, the error
-- 'ENGRAM_RATE <ms to wait>' and nothing read.
local function load_window(keys, args)
  local log, meta, turns = keys[1], keys[2], keys[3]
  local wait = take_rate(keys[5], tonumber(args[7]), tonumber(args[8]), now_ms())
  if wait > 0 then return rate_limited(wait) end
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then return { '', '', 1, {}, {}, {} } end
  local replay = {}
  if args[5] ~= '' then
    local ids = redis.call('HGET', turns, args[5])
    if ids then replay = entries_by_ids(log, ids) end
  end
  local after = args[2]
  if epoch ~= args[1] then after = '' end
  local budget, max_count = tonumber(args[3]), tonumber(args[4])
  local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  local first_id = first[1] and first[1][1] or ''
  local lower = '-'
  if after ~= '' then lower = '(' .. after end
  local upper, out, used, complete, chunk = '+', {}, 0, 0, 64
  while true do
    local batch = redis.call('XREVRANGE', log, upper, lower, 'COUNT', chunk)
    local full = false
    for i = 1, #batch do
      local tokens = tonumber(field(batch[i][2], 'tokens')) or 0
      if used + tokens > budget or #out >= max_count then full = true; break end
      used = used + tokens
      out[#out + 1] = batch[i]
    end
    if full then break end
    if #batch < chunk then complete = 1; break end
    upper = '(' .. batch[#batch][1]
  end
  return { epoch, first_id, complete, replay, out, load_summary(log, keys[4], epoch, tonumber(args[6]) or 0) }
end

-- commit: SESSION KEYS (+ the subject's set when subject is given). ARGV turn_id, ttl, max_messages,
-- session_id, label, max_sessions, max_bytes, subject, count, then count x (role, content, tokens, extra).
-- label ('' = none) is the LlamaIndex key the session id stands for, kept in meta when the id cannot be
-- decoded back into it (see llama_index/keys.py). All messages are appended adjacently in one atomic call.
-- Returns {duplicate(0|1), epoch, entries, previous_id, tenant_bytes, tenant_sessions}; a known turn_id
-- returns what was stored the first time. previous_id (the newest id before this commit) lets a cache
-- that held exactly that tail extend itself, so the committing process's next load is a hit.
-- Refused before anything is written: 'ENGRAM_QUOTA sessions <max>' (a new session over max_sessions),
-- 'ENGRAM_QUOTA bytes <max> <used>' (the messages would take the tenant over max_bytes; 0 = no limit),
-- 'ENGRAM_SUBJECT <subject>' (the session belongs to another subject).
local function commit(keys, args)
  local log, meta, turns, index, usage, expiry = keys[1], keys[2], keys[3], keys[4], keys[6], keys[7]
  local turn_id, session_id, subject = args[1], args[4], args[8]
  if turn_id ~= '' then
    local ids = redis.call('HGET', turns, turn_id)
    if ids then return { 1, redis.call('HGET', meta, 'epoch') or '', entries_by_ids(log, ids) } end
  end
  local now = now_ms()
  sweep_expired(usage, expiry, now, 16)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch and subject ~= '' then
    local owner = redis.call('HGET', meta, 'subject')
    if owner and owner ~= subject then return redis.error_reply('ENGRAM_SUBJECT ' .. owner) end
  end
  local count = tonumber(args[9])
  local added = 0
  for i = 0, count - 1 do added = added + #args[10 + i * 4] + #args[11 + i * 4] + #args[13 + i * 4] end
  local max_sessions, max_bytes = tonumber(args[6]), tonumber(args[7])
  if epoch then
    track_usage(keys, session_id)
  else  -- a new session (or one that expired): what was counted for its id is gone
    forget_usage(usage, expiry, session_id)
    if max_sessions > 0 and redis.call('ZCARD', expiry) >= max_sessions then
      return redis.error_reply('ENGRAM_QUOTA sessions ' .. max_sessions)
    end
  end
  local used = tonumber(redis.call('HGET', usage, TOTAL) or 0)
  if max_bytes > 0 and used + added > max_bytes then
    return redis.error_reply('ENGRAM_QUOTA bytes ' .. max_bytes .. ' ' .. used)
  end
  if not epoch then
    epoch = new_epoch(meta)
    redis.call('HSET', meta, 'created', now)
  end
  redis.call('HSET', meta, 'updated', now)
  set_label(meta, args[5])
  local before = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  local previous_id = before[1] and before[1][1] or ''
  local entries = append_messages(log, args, 10, count, turn_id)
  if turn_id ~= '' then
    local ids = {}
    for i = 1, #entries do ids[i] = entries[i][1] end
    redis.call('HSET', turns, turn_id, table.concat(ids, ' '))
  end
  add_usage(usage, session_id, added - apply_retention(log, turns, tonumber(args[3])))
  local ttl = tonumber(args[2])
  apply_ttl(keys, session_id, ttl, now)
  link_subject(keys, session_id, subject, ttl)
  redis.call('ZADD', index, 0, session_id)
  return { 0, epoch, entries, previous_id, tonumber(redis.call('HGET', usage, TOTAL) or 0), redis.call('ZCARD', expiry) }
end

-- Recount the session's bytes after a rewrite (O(its messages), as the rewrite itself is).
local function recount_usage(keys, session_id)
  local n = stream_bytes(keys[1]) + stream_bytes(keys[5])
  if n == 0 and redis.call('EXISTS', keys[2]) == 0 then
    forget_usage(keys[6], keys[7], session_id)
    return
  end
  local counted = tonumber(redis.call('HGET', keys[6], session_id) or 0)
  add_usage(keys[6], session_id, n - counted)
  redis.call('HSETNX', keys[6], session_id, 0)
end

-- replace: SESSION KEYS. ARGV ttl, max_messages, session_id, label, count, messages...
-- Atomically swaps the session's whole history (LlamaIndex set_messages). Zero messages = delete.
local function replace(keys, args)
  local log, meta, turns, index = keys[1], keys[2], keys[3], keys[4]
  local count = tonumber(args[5])
  redis.call('DEL', log, turns)
  if count == 0 then
    redis.call('DEL', meta)
    redis.call('DEL', keys[8])  -- the rolling summary goes with the session
    redis.call('ZREM', index, args[3])
    recount_usage(keys, args[3])
    return { '', {} }
  end
  local epoch = new_epoch(meta)
  local now = now_ms()
  redis.call('HSETNX', meta, 'created', now)
  redis.call('HSET', meta, 'updated', now)
  set_label(meta, args[4])
  local entries = append_messages(log, args, 6, count, '')
  apply_retention(log, turns, tonumber(args[2]))
  apply_ttl(keys, args[3], tonumber(args[1]), now)
  recount_usage(keys, args[3])
  redis.call('ZADD', index, 0, args[3])
  return { epoch, entries }
end

-- delete_at: SESSION KEYS. ARGV position (0-based; negative counts from the newest, -1 = last), session_id.
-- Removes one message, keeps the order and TTL of the rest, and changes the epoch so caches reload.
local function delete_at(keys, args)
  local log, meta = keys[1], keys[2]
  local position = tonumber(args[1])
  local found
  if position >= 0 then
    found = redis.call('XRANGE', log, '-', '+', 'COUNT', position + 1)
    found = found[position + 1]
  else
    found = redis.call('XREVRANGE', log, '+', '-', 'COUNT', -position)
    found = found[-position]
  end
  if not found then return {} end
  track_usage(keys, args[2])
  redis.call('XDEL', log, found[1])
  add_usage(keys[6], args[2], -entry_bytes(found[2]))
  new_epoch(meta)
  return { found }
end

-- insert_at: SESSION KEYS. ARGV position, ttl, max_messages, session_id, label, role, content, tokens,
-- extra. Inserts one message before the one at position, as Python's list.insert does (negative counts
-- from the end; out of range clamps to either end). A stream only appends, so the messages from position
-- on are re-added after the new one (their ids change: new epoch, and their turns map to the new ids).
-- Costs O(messages after position).
local function insert_at(keys, args)
  local log, meta, turns, index = keys[1], keys[2], keys[3], keys[4]
  local len = redis.call('XLEN', log)
  local position = tonumber(args[1])
  if position < 0 then position = math.max(0, len + position) end
  if position > len then position = len end
  track_usage(keys, args[4])
  local tail = {}
  if position < len then tail = redis.call('XREVRANGE', log, '+', '-', 'COUNT', len - position) end
  for i = 1, #tail do redis.call('XDEL', log, tail[i][1]) end
  local now = now_ms()
  redis.call('HSETNX', meta, 'created', now)
  redis.call('HSET', meta, 'updated', now)
  set_label(meta, args[5])
  local entries = append_messages(log, args, 6, 1, '')
  local added = entries_bytes(entries)
  local renamed = {}
  for i = #tail, 1, -1 do  -- oldest first
    local id = redis.call('XADD', log, '*', unpack(tail[i][2]))
    renamed[tail[i][1]] = id
    entries[#entries + 1] = { id, tail[i][2] }
    local turn = field(tail[i][2], 'turn')
    if turn then
      local ids = redis.call('HGET', turns, turn)
      if ids then
        local moved = {}
        for old in string.gmatch(ids, '%S+') do moved[#moved + 1] = renamed[old] or old end
        redis.call('HSET', turns, turn, table.concat(moved, ' '))
      end
    end
  end
  if #tail > 0 or not redis.call('HGET', meta, 'epoch') then new_epoch(meta) end
  add_usage(keys[6], args[4], added - apply_retention(log, turns, tonumber(args[3])))
  apply_ttl(keys, args[4], tonumber(args[2]), now)
  redis.call('ZADD', index, 0, args[4])
  return entries
end

-- delete_session: SESSION KEYS (+ the subject's set, when the session has a subject). ARGV session_id.
-- Removes everything of the session: its keys (summary and memory blocks included), its index entry, its
-- usage and its subject link. 1 when something was deleted.
local function delete_session(keys, args)
  local session_id = args[1]
  local existed = redis.call('DEL', keys[1], keys[2], keys[3], keys[5])
  redis.call('DEL', keys[8], keys[9], keys[10])  -- summary and memory blocks (alone, they are no session)
  local indexed = redis.call('ZREM', keys[4], session_id)
  forget_usage(keys[6], keys[7], session_id)
  if keys[11] then redis.call('SREM', keys[11], session_id) end
  if existed + indexed > 0 then return 1 end
  return 0
end

-- prune_index: KEYS index, then one session's log per ARGV. ARGV session ids. Removes from the index
-- the sessions whose log does not exist when this runs (deleted or expired), atomically with that check:
-- a session re-created between the caller's read and this call keeps its entry. Returns how many.
local function prune_index(keys, args)
  local index, removed = keys[1], 0
  for i = 1, #args do
    if redis.call('EXISTS', keys[i + 1]) == 0 then removed = removed + redis.call('ZREM', index, args[i]) end
  end
  return removed
end

-- take_oldest: SESSION KEYS. ARGV n, mode ('archive' moves them to the archive stream keeping their ids,
-- 'delete' drops them), session_id. Returns the entries taken. Caches need no new epoch: they drop
-- messages older than the log's first id, as after a retention trim.
local function take_oldest(keys, args)
  local log, archive = keys[1], keys[5]
  local n = tonumber(args[1])
  if n <= 0 then return {} end
  track_usage(keys, args[3])
  local taken = redis.call('XRANGE', log, '-', '+', 'COUNT', n)
  for i = 1, #taken do
    if args[2] == 'archive' then redis.call('XADD', archive, taken[i][1], unpack(taken[i][2])) end
    redis.call('XDEL', log, taken[i][1])
  end
  if args[2] == 'archive' and #taken > 0 then
    local ttl = redis.call('TTL', log)
    if ttl > 0 then redis.call('EXPIRE', archive, ttl) end
  end
  if args[2] ~= 'archive' then add_usage(keys[6], args[3], -entries_bytes(taken)) end
  return taken
end

-- rate: KEYS rate. ARGV rate, burst. Counts one request of the tenant (requests that are not turns; a
-- turn's load counts itself). 'ENGRAM_RATE <ms>' when over the rate.
local function rate(keys, args)
  local wait = take_rate(keys[1], tonumber(args[1]), tonumber(args[2]), now_ms())
  if wait > 0 then return rate_limited(wait) end
  return 0
end

-- usage: KEYS usage, expiry. Sweeps every expired session out of the tenant's usage, then returns
-- {bytes, sessions}. For the operator's status and `engram tenant list`.
local function usage(keys)
  local now = now_ms()
  while sweep_expired(keys[1], keys[2], now, 256) > 0 do end
  return { tonumber(redis.call('HGET', keys[1], TOTAL) or 0), redis.call('ZCARD', keys[2]) }
end

-- ---- rolling summary ---------------------------------------------------------------------------------
-- The summary hash: text, covers_through (stream id of the newest message folded in), messages_covered,
-- tokens (of text), epoch (the session's epoch when it was written). A summary of another epoch is void:
-- the log was rewritten (replace, delete_at, insert_at) or deleted and re-created since, so it counts
-- as empty, and the next advance starts over from the log's first message.
local function current_summary(summary, epoch)
  local got = redis.call('HMGET', summary, 'text', 'covers_through', 'messages_covered', 'tokens', 'epoch')
  if got[5] ~= epoch then return '', '', 0, 0 end
  return got[1] or '', got[2] or '', tonumber(got[3]) or 0, tonumber(got[4]) or 0
end

-- For the load: {text, covers_through, messages_covered, tokens, probe_id}. probe_id is the id of the
-- batch-th message after covers_through ('' if there are fewer): when it is older than the window's
-- first message, at least batch messages have fallen out of the window unsummarized. O(batch) reads.
load_summary = function(log, summary, epoch, batch)
  if batch <= 0 or not summary then return {} end
  local text, covers, covered, tokens = current_summary(summary, epoch)
  local lower = '-'
  if covers ~= '' then lower = '(' .. covers end
  local probe = redis.call('XRANGE', log, lower, '+', 'COUNT', batch)
  local probe_id = ''
  if #probe == batch then probe_id = probe[batch][1] end
  return { text, covers, covered, tokens, probe_id }
end

-- summary_advance: KEYS log, meta, summary. ARGV epoch, expected_covers_through ('' = none yet), text,
-- covers_through, count, tokens. Compare-and-set: writes only if the session still has that epoch and
-- the summary still covers through expected_covers_through; messages_covered grows by exactly count.
-- Returns 1 when written, 0 when another summarizer (or a rewrite) got there first. The summary lives
-- as long as the log (its TTL is copied; commit refreshes both).
local function summary_advance(keys, args)
  local log, meta, summary = keys[1], keys[2], keys[3]
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch or epoch ~= args[1] then return 0 end
  local _, covers, covered = current_summary(summary, epoch)
  if covers ~= args[2] then return 0 end
  redis.call('HSET', summary, 'text', args[3], 'covers_through', args[4],
    'messages_covered', covered + tonumber(args[5]), 'tokens', args[6], 'epoch', epoch)
  local ttl = redis.call('PTTL', log)
  if ttl > 0 then redis.call('PEXPIRE', summary, ttl) else redis.call('PERSIST', summary) end
  return 1
end

-- load writes nothing but the rate, and is NOT flagged no-writes on purpose: a turn's load must be
-- refused (OOM at maxmemory, READONLY on a replica) exactly when the commit after it would be, before the
-- model runs.
redis.register_function('engram_v4_load', load_window)
-- writable: refused by Redis whenever a write would be (OOM, READONLY, NOREPLICAS); /readyz calls it.
redis.register_function('engram_v4_writable', function() return 1 end)
redis.register_function('engram_v4_commit', commit)
redis.register_function('engram_v4_replace', replace)
redis.register_function('engram_v4_delete_at', delete_at)
-- Pure deletes may run when Redis is at maxmemory (noeviction), so a tenant can free space.
redis.register_function { function_name = 'engram_v4_delete_session', callback = delete_session, flags = { 'allow-oom' } }
redis.register_function { function_name = 'engram_v4_prune_index', callback = prune_index, flags = { 'allow-oom' } }
redis.register_function('engram_v4_take_oldest', take_oldest)
redis.register_function('engram_v4_insert_at', insert_at)
redis.register_function('engram_v4_rate', rate)
redis.register_function('engram_v4_usage', usage)
redis.register_function('engram_v4_summary_advance', summary_advance)
