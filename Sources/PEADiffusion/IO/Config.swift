#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A diffusers/transformers JSON configuration: `config.json`, `model_index.json`, `scheduler_config.json`,
/// `tokenizer_config.json`. The top level must be an object; the typed accessors read its top-level keys
/// and throw `PEAError.invalidConfig` naming the file, the key, what was expected and what was found.
///
/// Values are read as Python's `json` writes them (diffusers saves configs with `json.dumps`), so `NaN`
/// and `Infinity` are accepted, and an integral float such as `320.0` is accepted where an integer is wanted.
/// The accessors that take a `range` are how a reader says which values a field may take: the value is checked
/// where it is read (after conversion to the type it is used as), so a 0 that would divide, or a NaN that would
/// reach the image, is an error naming the file and the key.
public struct ConfigFile: Sendable {
    public let path: String
    public let values: [String: JSONValue]

    /// Reads and parses the file at `path`.
    public init(path: String) throws {
        let bytes = try readWholeFile(path)
        let document: JSONValue
        do {
            document = try JSONValue.parse(bytes)
        } catch let error as JSONParseError {
            throw PEAError.invalidConfig(path: path, reason: "invalid JSON: \(error)")
        }
        guard case .object(let values) = document else {
            throw PEAError.invalidConfig(path: path, reason: "expected a JSON object at the top level, found \(document.kindDescription)")
        }
        self.init(path: path, values: values)
    }

    /// A configuration from values already in memory (`path` is only used in error messages).
    public init(path: String, values: [String: JSONValue]) {
        self.path = path
        self.values = values
    }

    /// Whether the key is present (with any value, null included).
    public func contains(_ key: String) -> Bool { values[key] != nil }

    /// The raw value, or nil when the key is missing.
    public func value(_ key: String) -> JSONValue? { values[key] }

    // MARK: Integers

    /// An integer; integral floats (`320.0`) are accepted, `1.5` is not.
    public func int(_ key: String) throws -> Int {
        try integer(try required(key), key: key)
    }

    /// An integer, or `defaultValue` when the key is missing or null.
    public func int(_ key: String, default defaultValue: Int) throws -> Int {
        try optionalInt(key) ?? defaultValue
    }

    /// An integer, or nil when the key is missing or null.
    public func optionalInt(_ key: String) throws -> Int? {
        guard let value = present(key) else { return nil }
        return try integer(value, key: key)
    }

    /// A list of integers.
    public func intList(_ key: String) throws -> [Int] {
        try list(key).enumerated().map { index, element in try integer(element, key: "\(key)[\(index)]") }
    }

    /// diffusers' "int or one per block" fields (`attention_head_dim`, `transformer_layers_per_block`,
    /// `num_attention_heads`): an integer repeated `count` times, or a list that must have exactly `count` entries.
    public func intOrList(_ key: String, count: Int) throws -> [Int] {
        let value = try required(key)
        if case .array(let elements) = value {
            guard elements.count == count else {
                throw PEAError.invalidConfig(path: path, reason: "key '\(key)': expected an integer or a list of \(count) integers, found a list of \(elements.count)")
            }
            return try elements.enumerated().map { index, element in try integer(element, key: "\(key)[\(index)]") }
        }
        guard case .number = value else {
            throw PEAError.invalidConfig(path: path, reason: "key '\(key)': expected an integer or a list of \(count) integers, found \(value.kindDescription)")
        }
        return Array(repeating: try integer(value, key: key), count: count)
    }

    /// An integer within `range`.
    public func int(_ key: String, range: ConfigRange<Int>) throws -> Int {
        try checked(try int(key), key: key, range: range)
    }

    /// An integer within `range`, or `defaultValue` when the key is missing or null.
    public func int(_ key: String, default defaultValue: Int, range: ConfigRange<Int>) throws -> Int {
        try optionalInt(key, range: range) ?? defaultValue
    }

    /// An integer within `range`, or nil when the key is missing or null.
    public func optionalInt(_ key: String, range: ConfigRange<Int>) throws -> Int? {
        try optionalInt(key).map { try checked($0, key: key, range: range) }
    }

    /// A list of integers, each within `range`.
    public func intList(_ key: String, range: ConfigRange<Int>) throws -> [Int] {
        try intList(key).enumerated().map { index, element in try checked(element, key: "\(key)[\(index)]", range: range) }
    }

    /// `intOrList(_:count:)` with every entry within `range`.
    public func intOrList(_ key: String, count: Int, range: ConfigRange<Int>) throws -> [Int] {
        try intOrList(key, count: count).map { try checked($0, key: key, range: range) }
    }

    // MARK: Floating point

    /// A number (integers, NaN and ±Infinity included).
    public func double(_ key: String) throws -> Double {
        try number(try required(key), key: key)
    }

    /// A number, or `defaultValue` when the key is missing or null.
    public func double(_ key: String, default defaultValue: Double) throws -> Double {
        try optionalDouble(key) ?? defaultValue
    }

    /// A number, or nil when the key is missing or null.
    public func optionalDouble(_ key: String) throws -> Double? {
        guard let value = present(key) else { return nil }
        return try number(value, key: key)
    }

    /// A list of numbers (e.g. a scheduler's `trained_betas`).
    public func doubleList(_ key: String) throws -> [Double] {
        try list(key).enumerated().map { index, element in try number(element, key: "\(key)[\(index)]") }
    }

    /// A number within `range` (which only holds finite values).
    public func double(_ key: String, default defaultValue: Double, range: ConfigRange<Double>) throws -> Double {
        try optionalDouble(key, range: range) ?? defaultValue
    }

    /// A number within `range` (which only holds finite values), or nil when the key is missing or null.
    public func optionalDouble(_ key: String, range: ConfigRange<Double>) throws -> Double? {
        try optionalDouble(key).map { try checked($0, key: key, range: range) }
    }

    /// A number as the float32 it is used as, within `range` (which only holds finite values): 1e300 is finite
    /// as a Double and infinite as a Float, so the check comes after the conversion.
    public func float(_ key: String, default defaultValue: Float, range: ConfigRange<Float> = .finite) throws -> Float {
        try optionalFloat(key, range: range) ?? defaultValue
    }

    /// `float(_:default:range:)`, or nil when the key is missing or null.
    public func optionalFloat(_ key: String, range: ConfigRange<Float> = .finite) throws -> Float? {
        try optionalDouble(key).map { try checked(Float($0), key: key, range: range, found: JSONValue.format($0)) }
    }

    /// A list of numbers as float32, each within `range`.
    public func floatList(_ key: String, range: ConfigRange<Float> = .finite) throws -> [Float] {
        try doubleList(key).enumerated().map { index, element in
            try checked(Float(element), key: "\(key)[\(index)]", range: range, found: JSONValue.format(element))
        }
    }

    // MARK: Booleans

    /// A JSON boolean (`true`/`false`; numbers and strings are not accepted).
    public func bool(_ key: String) throws -> Bool {
        try boolean(try required(key), key: key)
    }

    /// A boolean, or `defaultValue` when the key is missing or null.
    public func bool(_ key: String, default defaultValue: Bool) throws -> Bool {
        try optionalBool(key) ?? defaultValue
    }

    /// A boolean, or nil when the key is missing or null.
    public func optionalBool(_ key: String) throws -> Bool? {
        guard let value = present(key) else { return nil }
        return try boolean(value, key: key)
    }

    // MARK: Strings

    public func string(_ key: String) throws -> String {
        try text(try required(key), key: key)
    }

    /// A string, or `defaultValue` when the key is missing or null.
    public func string(_ key: String, default defaultValue: String) throws -> String {
        try optionalString(key) ?? defaultValue
    }

    /// A string, or nil when the key is missing or null.
    public func optionalString(_ key: String) throws -> String? {
        guard let value = present(key) else { return nil }
        return try text(value, key: key)
    }

    /// A list of strings (e.g. `down_block_types`).
    public func stringList(_ key: String) throws -> [String] {
        try list(key).enumerated().map { index, element in try text(element, key: "\(key)[\(index)]") }
    }

    // MARK: Nested objects

    /// A nested object (e.g. transformers' `text_config`); wrap it in `ConfigFile(path:values:)` to read it
    /// with these accessors.
    public func object(_ key: String) throws -> [String: JSONValue] {
        let value = try required(key)
        guard case .object(let members) = value else { throw mismatch(key, expected: "an object", found: value) }
        return members
    }

    // MARK: Helpers

    private func required(_ key: String) throws -> JSONValue {
        guard let value = values[key] else {
            throw PEAError.invalidConfig(path: path, reason: "missing key '\(key)'")
        }
        return value
    }

    /// The value when present and not null.
    private func present(_ key: String) -> JSONValue? {
        guard let value = values[key], value != .null else { return nil }
        return value
    }

    private func list(_ key: String) throws -> [JSONValue] {
        let value = try required(key)
        guard case .array(let elements) = value else { throw mismatch(key, expected: "a list", found: value) }
        return elements
    }

    private func integer(_ value: JSONValue, key: String) throws -> Int {
        guard case .number(let number) = value else { throw mismatch(key, expected: "an integer", found: value) }
        guard let integer = Int(exactly: number) else {
            throw PEAError.invalidConfig(path: path, reason: "key '\(key)': expected an integer, found \(JSONValue.format(number)), which is not a whole number in range")
        }
        return integer
    }

    private func number(_ value: JSONValue, key: String) throws -> Double {
        guard case .number(let number) = value else { throw mismatch(key, expected: "a number", found: value) }
        return number
    }

    private func boolean(_ value: JSONValue, key: String) throws -> Bool {
        guard case .bool(let flag) = value else { throw mismatch(key, expected: "a boolean", found: value) }
        return flag
    }

    private func text(_ value: JSONValue, key: String) throws -> String {
        guard case .string(let string) = value else { throw mismatch(key, expected: "a string", found: value) }
        return string
    }

    /// `value` when `range` holds it; `found` says the value as the file has it (before a float32 conversion).
    private func checked<Value>(_ value: Value, key: String, range: ConfigRange<Value>, found: String? = nil) throws -> Value {
        guard range.contains(value) else {
            throw PEAError.invalidConfig(path: path, reason: "key '\(key)': must be \(range.description), found \(found ?? "\(value)")")
        }
        return value
    }

    private func mismatch(_ key: String, expected: String, found: JSONValue) -> PEAError {
        .invalidConfig(path: path, reason: "key '\(key)': expected \(expected), found \(found.kindDescription)")
    }
}

/// The values a config number may take, and how an error message says them ("at least 1", "in (0, 1)").
/// The floating-point ranges only hold finite values.
public struct ConfigRange<Value: Comparable>: Sendable {
    public let description: String
    public let contains: @Sendable (Value) -> Bool

    public init(_ description: String, contains: @escaping @Sendable (Value) -> Bool) {
        self.description = description
        self.contains = contains
    }
}

extension ConfigRange where Value: BinaryInteger & Sendable {
    /// A count or size that must be at least `minimum` (1 where 0 would leave nothing or divide by zero).
    public static func atLeast(_ minimum: Value) -> ConfigRange {
        ConfigRange("at least \(minimum)") { $0 >= minimum }
    }

    /// How many layers a model stacks (per block, or in all): 1...4096. A model is built with that many modules
    /// before its weights are read, so a count like 10¹² must be refused here, not run out of memory there; real
    /// models stack a few dozen.
    public static var layerCount: ConfigRange { ConfigRange("in 1...4096") { $0 >= 1 && $0 <= 4096 } }
}

extension ConfigRange where Value: BinaryFloatingPoint & Sendable {
    public static var finite: ConfigRange { ConfigRange("finite (as a \(Value.self))") { $0.isFinite } }

    /// Finite and above 0 (an epsilon, a range bound).
    public static var positive: ConfigRange { ConfigRange("finite and above 0") { $0.isFinite && $0 > 0 } }

    /// Finite and at least `minimum`.
    public static func atLeast(_ minimum: Value) -> ConfigRange {
        ConfigRange("finite and at least \(minimum)") { $0.isFinite && $0 >= minimum }
    }

    /// A divisor (the VAE's scaling_factor): finite, not 0, and with a finite reciprocal (1e-40 is not 0, but
    /// 1 / 1e-40 is infinite as a Float).
    public static var invertible: ConfigRange {
        ConfigRange("finite and not 0, with a finite reciprocal") { $0.isFinite && (1 / $0).isFinite }
    }

    /// Strictly between 0 and 1 (a noise schedule's β).
    public static var openUnitInterval: ConfigRange { ConfigRange("in (0, 1)") { $0 > 0 && $0 < 1 } }
}
