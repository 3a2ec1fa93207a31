#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The queue of `pea serve`: connection threads submit requests (each a list of `JobItem`s, one per image) and
/// wait; one scheduler thread takes the oldest queued item and every queued item that can be denoised with it —
/// the same rule as a prompt-file job's batches (`JobBatches.plan`: same size, steps, guidance and scheduler, at
/// most `maxBatch` images) and the same conditioning (`choice`: the PEA adapter or the English encoder) — and
/// runs them in one call of `run`; each request gets its own images back.
///
/// The queue is bounded: at most `maxQueue` requests wait for their first image to start; more are refused
/// (`Refusal.full`), so that a burst gets a quick 503 instead of an unbounded wait.
public final class GenerationQueue: @unchecked Sendable {
    /// Runs one batch: items of one `choice`, compatible by `JobItem.batchKey`; returns each item's images in order.
    public typealias Runner = (_ items: [JobItem], _ choice: String) throws -> [[RGBImage]]

    public enum Refusal: Error, Equatable {
        /// `maxQueue` requests are waiting already.
        case full
        /// The queue is stopping.
        case stopped
        /// The batch holding one of the request's items failed: the runner's error.
        case failed(String)
        /// `cancelled()` said the request is no longer wanted; its items that had not started were dropped.
        case cancelled
    }

    public let maxBatch: Int
    public let maxQueue: Int
    /// Seconds the scheduler waits, after the oldest item arrived, for more compatible items while its batch is
    /// not full (0: it starts at once with what is queued).
    public let batchWait: Double
    /// Called on the scheduler thread after each batch with its image count and whether it succeeded.
    public var onBatch: (_ images: Int, _ succeeded: Bool) -> Void = { _, _ in }
    /// Called when a request is cancelled (under the queue's lock: it must not call back into the queue).
    public var onCancel: () -> Void = {}

    private final class Ticket {
        var images: [[RGBImage]?]
        var waiting: Int
        var notStarted: Int
        var error: String?
        init(count: Int) {
            images = Array(repeating: nil, count: count)
            waiting = count
            notStarted = count
        }
    }

    private struct Entry {
        var item: JobItem
        var choice: String
        var ticket: Ticket
        /// The item's position in its request.
        var slot: Int
        var arrived: Double
    }

    private let run: Runner
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var queue: [Entry] = []
    private var waitingRequests = 0
    private var sequence = 0
    private var stopping = false
    private var finished = false
    private var thread = pthread_t()

    public init(maxBatch: Int, maxQueue: Int, batchWait: Double = 0, run: @escaping Runner) throws {
        precondition(maxBatch > 0 && maxQueue > 0)
        self.maxBatch = maxBatch
        self.maxQueue = maxQueue
        self.batchWait = batchWait
        self.run = run
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        changed.initialize(to: pthread_cond_t())
        pthread_cond_init(changed, nil)
        guard let started = startThread({ self.schedule() }) else {
            throw PEAError.unsupported("cannot start the generation queue's thread: \(systemErrorMessage())")
        }
        thread = started
    }

    deinit {
        pthread_cond_destroy(changed)
        pthread_mutex_destroy(mutex)
        changed.deallocate()
        mutex.deallocate()
    }

    private func locked<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Requests waiting for their first image to start.
    public var depth: Int { locked { waitingRequests } }

    /// Queues a request's items (their `index` is replaced by the queue's arrival order) and waits for their
    /// images, in the items' order. `cancelled` is asked about every 0.1 s while the request waits (its client
    /// has gone, say): when it says yes, the items not yet started leave the queue and `Refusal.cancelled` is
    /// thrown (a batch already running is not interrupted).
    public func submit(_ items: [JobItem], choice: String, cancelled: () -> Bool = { false }) throws -> [[RGBImage]] {
        precondition(!items.isEmpty)
        let ticket = Ticket(count: items.count)
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if stopping { throw Refusal.stopped }
        guard waitingRequests < maxQueue else { throw Refusal.full }
        waitingRequests += 1
        let now = monotonicSeconds()
        for (slot, item) in items.enumerated() {
            var item = item
            item.index = sequence
            sequence += 1
            queue.append(Entry(item: item, choice: choice, ticket: ticket, slot: slot, arrived: now))
        }
        pthread_cond_broadcast(changed)
        while ticket.waiting > 0 {
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            var until = timespec(tv_sec: now.tv_sec, tv_nsec: now.tv_nsec + 100_000_000)
            if until.tv_nsec >= 1_000_000_000 { until.tv_sec += 1; until.tv_nsec -= 1_000_000_000 }
            pthread_cond_timedwait(changed, mutex, &until)
            if ticket.waiting > 0, cancelled() {
                queue.removeAll { $0.ticket === ticket }
                if ticket.notStarted == ticket.images.count { waitingRequests -= 1 }
                ticket.notStarted = 0
                onCancel()
                throw Refusal.cancelled
            }
        }
        if let error = ticket.error { throw Refusal.failed(error) }
        return ticket.images.map { $0! }
    }

    /// Finishes what is queued, then ends the scheduler thread; later submissions are refused. Only the first
    /// call does anything.
    public func stop() {
        let first: Bool = locked {
            defer { stopping = true }
            pthread_cond_broadcast(changed)
            return !stopping
        }
        if first { pthread_join(thread, nil) }
    }

    /// The next batch: the oldest entry and the compatible ones `JobBatches.plan` puts with it. Called locked.
    private func nextBatch() -> [Entry] {
        let oldest = queue[0]
        let candidates = queue.filter { $0.choice == oldest.choice }
        let batch = JobBatches.plan(candidates.map(\.item), size: maxBatch)[0]
        let indices = Set(batch.map(\.index))
        return candidates.filter { indices.contains($0.item.index) }
    }

    private func schedule() {
        while true {
            pthread_mutex_lock(mutex)
            while queue.isEmpty && !stopping { pthread_cond_wait(changed, mutex) }
            if queue.isEmpty {
                pthread_mutex_unlock(mutex)
                return
            }
            var batch = nextBatch()
            // Dynamic batching window: wait a little for compatible requests while the batch has room. The lock
            // is released meanwhile, so requests may come and (cancelled) go: the batch is planned again.
            while batchWait > 0, !stopping, batch.reduce(0, { $0 + $1.item.batch }) < maxBatch,
                  monotonicSeconds() < queue[0].arrived + batchWait {
                pthread_mutex_unlock(mutex)
                usleep(5_000)
                pthread_mutex_lock(mutex)
                if queue.isEmpty { break }
                batch = nextBatch()
            }
            if queue.isEmpty {
                pthread_mutex_unlock(mutex)
                continue
            }
            let taken = Set(batch.map(\.item.index))
            queue.removeAll { taken.contains($0.item.index) }
            for entry in batch {
                entry.ticket.notStarted -= 1
                if entry.ticket.notStarted == entry.ticket.images.count - 1 { waitingRequests -= 1 }
            }
            pthread_mutex_unlock(mutex)

            let result = Result { try run(batch.map(\.item), batch[0].choice) }
            let images = batch.reduce(0) { $0 + $1.item.batch }
            if case .success(let made) = result, made.count != batch.count {
                fatalError("the generation runner returned \(made.count) results for \(batch.count) items")
            }
            onBatch(images, (try? result.get()) != nil)
            locked {
                for (number, entry) in batch.enumerated() {
                    switch result {
                    case .success(let made): entry.ticket.images[entry.slot] = made[number]
                    case .failure(let error): entry.ticket.error = "\(error)"
                    }
                    entry.ticket.waiting -= 1
                }
                pthread_cond_broadcast(changed)
            }
        }
    }
}
