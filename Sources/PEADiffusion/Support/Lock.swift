#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A mutual-exclusion lock over pthread_mutex (no Foundation), with one condition variable: a thread holding the
/// lock may `wait` until another thread changes what the lock guards and calls `broadcast`.
final class PThreadLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        #if !canImport(Darwin)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)   // timed waits immune to wall-clock changes
        #endif
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    func withLock<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Inside `withLock`: releases the lock until a `broadcast` (or a spurious wake-up: callers re-check their
    /// condition in a loop), then holds it again.
    func wait() {
        pthread_cond_wait(condition, mutex)
    }

    /// As `wait()`, for at most `seconds`.
    func wait(seconds: Double) {
        guard seconds > 0 else { return }
        var until = timespec()
        #if canImport(Darwin)
        clock_gettime(CLOCK_REALTIME, &until)
        #else
        clock_gettime(CLOCK_MONOTONIC, &until)
        #endif
        let nanoseconds = Int(until.tv_nsec) + Int(seconds.truncatingRemainder(dividingBy: 1) * 1e9)
        until.tv_sec += Int(seconds) + nanoseconds / 1_000_000_000
        until.tv_nsec = nanoseconds % 1_000_000_000
        pthread_cond_timedwait(condition, mutex, &until)
    }

    /// Wakes every thread in `wait`. Called inside `withLock`.
    func broadcast() {
        pthread_cond_broadcast(condition)
    }
}
