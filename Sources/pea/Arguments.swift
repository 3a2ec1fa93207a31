import PEADiffusion

/// A small command-line option reader: `--name value` and `--name=value` options, `--flag` switches.
/// Every option a command accepts is declared up front, so an unknown or repeated flag, a missing value
/// or a value of the wrong type is a usage error that names it.
struct Arguments {
    enum Kind { case value, flag, repeatable }

    private var values: [String: [String]] = [:]
    private let command: String

    /// `spec` maps each accepted option (with its dashes) to its kind.
    init(_ arguments: [String], command: String, spec: [String: Kind]) throws {
        self.command = command
        var index = 0
        while index < arguments.count {
            var name = arguments[index]
            var inlineValue: String?
            if let equals = name.firstIndex(of: "="), name.hasPrefix("--") {
                inlineValue = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            guard let kind = spec[name] else {
                if name.hasPrefix("-") {
                    throw PEAError.usage("\(command): unknown option '\(name)' (see 'pea \(command) --help')")
                }
                throw PEAError.usage("\(command): unexpected argument '\(name)' (see 'pea \(command) --help')")
            }
            if kind != .repeatable, values[name] != nil {
                throw PEAError.usage("\(command): option '\(name)' given more than once")
            }
            switch kind {
            case .flag:
                if inlineValue != nil { throw PEAError.usage("\(command): option '\(name)' takes no value") }
                values[name, default: []].append("")
            case .value, .repeatable:
                if let inlineValue {
                    values[name, default: []].append(inlineValue)
                } else {
                    index += 1
                    guard index < arguments.count else {
                        throw PEAError.usage("\(command): option '\(name)' needs a value")
                    }
                    values[name, default: []].append(arguments[index])
                }
            }
            index += 1
        }
    }

    func has(_ name: String) -> Bool { values[name] != nil }

    func string(_ name: String) -> String? { values[name]?.last }

    func strings(_ name: String) -> [String] { values[name] ?? [] }

    func requiredString(_ name: String) throws -> String {
        guard let value = string(name) else { throw PEAError.usage("\(command): option '\(name)' is required") }
        return value
    }

    func int(_ name: String) throws -> Int? {
        guard let text = string(name) else { return nil }
        guard let value = Int(text) else {
            throw PEAError.usage("\(command): option '\(name)' expects an integer, got '\(text)'")
        }
        return value
    }

    func int(_ name: String, default fallback: Int, range: ClosedRange<Int>) throws -> Int {
        let value = try int(name) ?? fallback
        guard range.contains(value) else {
            throw PEAError.usage("\(command): option '\(name)' must be in \(range.lowerBound)...\(range.upperBound), got \(value)")
        }
        return value
    }

    func double(_ name: String) throws -> Double? {
        guard let text = string(name) else { return nil }
        guard let value = Double(text), value.isFinite else {
            throw PEAError.usage("\(command): option '\(name)' expects a number, got '\(text)'")
        }
        return value
    }
}
