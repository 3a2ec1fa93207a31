/// The counters `GET /metrics` reports, in Prometheus' text exposition format.
public final class ServeMetrics: @unchecked Sendable {
    /// Upper bounds (seconds) of the request latency histogram's buckets.
    public static let latencyBuckets: [Double] = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

    private let lock = PThreadLock()
    private var requests: [String: Int] = [:]   // "endpoint\u{0}status"
    private var latencyCounts: [String: [Int]] = [:]   // endpoint → count per bucket (not cumulative), +Inf last
    private var latencySums: [String: Double] = [:]
    private var images = 0
    private var batches: [Int: Int] = [:]
    private var failedBatches = 0
    private var cancelled = 0

    public init() {}

    private func locked<R>(_ body: () -> R) -> R { lock.withLock(body) }

    /// A metric family's `# HELP` and `# TYPE` lines.
    private static func family(_ name: String, _ type: String, _ help: String) -> String {
        "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
    }

    public func request(endpoint: String, status: Int, seconds: Double) {
        locked {
            requests["\(endpoint)\u{0}\(status)", default: 0] += 1
            var counts = latencyCounts[endpoint] ?? Array(repeating: 0, count: ServeMetrics.latencyBuckets.count + 1)
            counts[ServeMetrics.latencyBuckets.firstIndex { seconds <= $0 } ?? ServeMetrics.latencyBuckets.count] += 1
            latencyCounts[endpoint] = counts
            latencySums[endpoint, default: 0] += seconds
        }
    }

    public func batch(images count: Int, succeeded: Bool) {
        locked {
            batches[count, default: 0] += 1
            if succeeded { images += count } else { failedBatches += 1 }
        }
    }

    public func requestCancelled() { locked { cancelled += 1 } }

    /// How many batches of `images` images ran.
    public func batches(ofSize images: Int) -> Int { locked { batches[images] ?? 0 } }

    public func text(queueDepth: Int) -> String {
        locked {
            var out = Self.family("pea_requests_total", "counter", "HTTP requests answered, by endpoint and status.")
            for key in requests.keys.sorted() {
                let parts = key.split(separator: "\u{0}", omittingEmptySubsequences: false)
                out += "pea_requests_total{endpoint=\"\(parts[0])\",status=\"\(parts[1])\"} \(requests[key]!)\n"
            }
            out += Self.family("pea_images_generated_total", "counter", "Images generated.")
            out += "pea_images_generated_total \(images)\n"
            out += Self.family("pea_queue_depth", "gauge", "Requests waiting for generation to start.")
            out += "pea_queue_depth \(queueDepth)\n"
            out += Self.family("pea_batches_total", "counter", "Denoising batches run, by their image count.")
            for size in batches.keys.sorted() { out += "pea_batches_total{images=\"\(size)\"} \(batches[size]!)\n" }
            out += Self.family("pea_batches_failed_total", "counter", "Batches whose generation failed.")
            out += "pea_batches_failed_total \(failedBatches)\n"
            out += Self.family("pea_requests_cancelled_total", "counter", "Requests dropped from the queue because their client went away.")
            out += "pea_requests_cancelled_total \(cancelled)\n"
            out += Self.family("pea_request_duration_seconds", "histogram", "Time from a request's arrival to its response, by endpoint.")
            for endpoint in latencyCounts.keys.sorted() {
                var cumulative = 0
                for (number, count) in latencyCounts[endpoint]!.enumerated() {
                    cumulative += count
                    let bound = number < ServeMetrics.latencyBuckets.count ? "\(ServeMetrics.latencyBuckets[number])" : "+Inf"
                    out += "pea_request_duration_seconds_bucket{endpoint=\"\(endpoint)\",le=\"\(bound)\"} \(cumulative)\n"
                }
                out += "pea_request_duration_seconds_sum{endpoint=\"\(endpoint)\"} \(latencySums[endpoint]!)\n"
                out += "pea_request_duration_seconds_count{endpoint=\"\(endpoint)\"} \(cumulative)\n"
            }
            return out
        }
    }
}
