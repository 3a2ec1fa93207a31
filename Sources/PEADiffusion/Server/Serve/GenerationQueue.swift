#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The queue of `pea serve`: connection threads submit requests (each a list of `JobItem`s, one per image) and
/// wait; one scheduler thread takes the oldest queued item and every queued item that can be denoised with it —
/// the same rule as a prompt-file job's batches (`JobBatches.plan`: same size, steps, guidance, scheduler and
/// ControlNet settings, at most `maxBatch` images) and the same conditioning (`choice`: the PEA adapter or the English encoder) — and
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
    /// Guards everything below; its condition is broadcast whenever the queue or a ticket changes.
    private let lock = PThreadLock()
    private var queue: [Entry] = []
    private var waitingRequests = 0
    private var sequence = 0
    private var stopping = false
    private var thread = pthread_t()

    public init(maxBatch: Int, maxQueue: Int, batchWait: Double = 0, run: @escaping Runner) throws {
        precondition(maxBatch > 0 && maxQueue > 0)
        self.maxBatch = maxBatch
        self.maxQueue = maxQueue
        self.batchWait = batchWait
        self.run = run
        guard let started = startThread({ self.schedule() }) else {
            throw PEAError.unsupported("cannot start the generation queue's thread: \(systemErrorMessage())")
        }
        thread = started
    }

    /// Requests waiting for their first image to start.
    public var depth: Int { lock.withLock { waitingRequests } }

    /// Queues a request's items (their `index` is replaced by the queue's arrival order) and waits for their
    /// images, in the items' order. `cancelled` is asked about every 0.1 s while the request waits (its client
    /// has gone, say): when it says yes, the items not yet started leave the queue and `Refusal.cancelled` is
    /// thrown (a batch already running is not interrupted).
    public func submit(_ items: [JobItem], choice: String, cancelled: () -> Bool = { false }) throws -> [[RGBImage]] {
        precondition(!items.isEmpty)
        let ticket = Ticket(count: items.count)
        return try lock.withLock {
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
            lock.broadcast()
            while ticket.waiting > 0 {
                lock.wait(seconds: 0.1)
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
    }

    /// Finishes what is queued, then ends the scheduler thread; later submissions are refused. Only the first
    /// call does anything.
    public func stop() {
        let first: Bool = lock.withLock {
            defer { stopping = true }
            lock.broadcast()
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

    /// Waits for queued items and takes the next batch out of the queue; nil once the queue is stopping and empty.
    private func takeBatch() -> [Entry]? {
        lock.withLock {
            while true {
                while queue.isEmpty && !stopping { lock.wait() }
                if queue.isEmpty { return nil }
                var batch = nextBatch()
                // Dynamic batching window: wait a little for compatible requests while the batch has room. The
                // lock is released meanwhile, so requests may come and (cancelled) go: the batch is planned again.
                while batchWait > 0, !stopping, !queue.isEmpty, batch.reduce(0, { $0 + $1.item.batch }) < maxBatch {
                    let left = queue[0].arrived + batchWait - monotonicSeconds()
                    if left <= 0 { break }
                    lock.wait(seconds: left)
                    if !queue.isEmpty { batch = nextBatch() }
                }
                if queue.isEmpty { continue }
                let taken = Set(batch.map(\.item.index))
                queue.removeAll { taken.contains($0.item.index) }
                for entry in batch {
                    entry.ticket.notStarted -= 1
                    if entry.ticket.notStarted == entry.ticket.images.count - 1 { waitingRequests -= 1 }
                }
                return batch
            }
        }
    }

    private func schedule() {
        while let batch = takeBatch() {
            let result = Result { try run(batch.map(\.item), batch[0].choice) }
            let images = batch.reduce(0) { $0 + $1.item.batch }
            if case .success(let made) = result, made.count != batch.count {
                fatalError("the generation runner returned \(made.count) results for \(batch.count) items")
            }
            onBatch(images, (try? result.get()) != nil)
            lock.withLock {
                for (number, entry) in batch.enumerated() {
                    switch result {
                    case .success(let made): entry.ticket.images[entry.slot] = made[number]
                    case .failure(let error): entry.ticket.error = "\(error)"
                    }
                    entry.ticket.waiting -= 1
                }
                lock.broadcast()
            }
        }
    }
}
